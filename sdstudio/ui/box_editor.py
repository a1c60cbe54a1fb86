"""A box editor on a picture: draw a box with the mouse, drag it to move it, drag its corner to resize it, give it a
label. Built on gr.HTML (a template, CSS and a script), so it needs no custom-component build.

Its value is plain JSON, the same in Python and in the browser:

    {"width": 512, "height": 512,          # the picture's shape (the canvas keeps its aspect ratio)
     "image": "data:image/jpeg;base64,...",  # an optional backdrop ("" for none)
     "kind": "grounding",                    # what a newly drawn box is
     "kinds": [["grounding", "GLIGEN phrase"], ["region", "Region prompt"]],
     "selected": 0,
     "boxes": [{"kind": "grounding", "label": "a red car", "box": [x0, y0, x1, y1], "enabled": true,
                "extra": {...}}]}         # box as fractions of the picture; extra rides along untouched

The Playground uses it for GLIGEN phrases and Mix-of-Show regions, the Dataset tab for a dataset's boxes.jsonl.
Python never trusts the value: `read_boxes` parses the numbers, clamps them into the picture and drops the rest.
"""
from __future__ import annotations

import base64
import io
import math

import gradio as gr

MIN_SIDE = 0.01

_CSS = """
.bx { display: flex; flex-direction: column; gap: 6px; font-size: 13px; }
.bx:focus { outline: none; }
.bx-bar input[type=checkbox] { appearance: auto; -webkit-appearance: checkbox; width: 14px; height: 14px;
  margin: 0 2px 0 0; vertical-align: middle; }
.bx-bar { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.bx-bar input[type=text] { flex: 1 1 160px; min-width: 120px; padding: 4px 6px; border: 1px solid #bbb;
  border-radius: 4px; background: var(--input-background-fill, #fff); color: inherit; }
.bx-bar .bx-coords { flex: 0 1 190px; font-family: monospace; }
.bx-bar select, .bx-bar button { padding: 3px 6px; border: 1px solid #bbb; border-radius: 4px;
  background: var(--button-secondary-background-fill, #f4f4f4); color: inherit; cursor: pointer; }
.bx-stage { position: relative; width: 100%; max-height: 480px; background-color: #8a8f98;
  background-image: linear-gradient(45deg, #9aa0a8 25%, transparent 25%, transparent 75%, #9aa0a8 75%),
                    linear-gradient(45deg, #9aa0a8 25%, transparent 25%, transparent 75%, #9aa0a8 75%);
  background-size: 24px 24px; background-position: 0 0, 12px 12px; cursor: crosshair; touch-action: none;
  user-select: none; overflow: hidden; border-radius: 6px; }
.bx-stage img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: fill; pointer-events: none; }
.bx-box { position: absolute; border: 2px solid var(--c); background: color-mix(in srgb, var(--c) 18%, transparent);
  box-sizing: border-box; cursor: move; }
.bx-box.region { border-style: dashed; }
.bx-box.off { opacity: 0.45; }
.bx-box.sel { outline: 2px solid #fff; outline-offset: 1px; z-index: 2; }
.bx-tag { position: absolute; left: -2px; top: -2px; transform: translateY(-100%); background: var(--c);
  color: #fff; padding: 0 5px; border-radius: 3px 3px 0 0; white-space: nowrap; max-width: 220px; overflow: hidden;
  text-overflow: ellipsis; font-size: 12px; line-height: 18px; }
.bx-box.low .bx-tag { transform: none; top: 0; border-radius: 0 0 3px 0; }
.bx-h { position: absolute; right: -6px; bottom: -6px; width: 12px; height: 12px; background: #fff;
  border: 2px solid var(--c); border-radius: 2px; cursor: nwse-resize; }
.bx-help { opacity: 0.7; font-size: 12px; }
"""

_JS = r"""
const COLORS = ['#e4572e', '#2e86ab', '#76b041', '#f2a541', '#9b5de5', '#00a6a6', '#d1495b', '#3d5a80'];
const root = element.querySelector('.bx');
root.innerHTML = `
  <div class="bx-bar">
    <select class="bx-kind" title="What a new box is"></select>
    <input type="text" class="bx-label" placeholder="Draw a box, then label it here">
    <input type="text" class="bx-coords" placeholder="x0, y0, x1, y1" title="The selected box as fractions">
    <label class="bx-on-l"><input type="checkbox" class="bx-on"> on</label>
    <button type="button" class="bx-del" title="Delete the selected box">Delete</button>
  </div>
  <div class="bx-stage"><img alt="" hidden></div>
  <div class="bx-help">Drag on the picture to draw a box, drag a box to move it, drag its corner to resize it.</div>`;
const stage = root.querySelector('.bx-stage');
const img = stage.querySelector('img');
const label = root.querySelector('.bx-label');
const coords = root.querySelector('.bx-coords');
const kindSel = root.querySelector('.bx-kind');
const onBox = root.querySelector('.bx-on');
const delBtn = root.querySelector('.bx-del');
let st = {boxes: []};
let drag = null;

const clamp = (v, a, b) => Math.min(b, Math.max(a, v));
const r4 = (v) => Math.round(v * 10000) / 10000;
function load() {
  const v = props.value;
  st = (v && typeof v === 'object') ? JSON.parse(JSON.stringify(v)) : {};
  if (!Array.isArray(st.boxes)) st.boxes = [];
  if (!Array.isArray(st.kinds) || !st.kinds.length) st.kinds = [['box', 'Box']];
  if (!st.kind) st.kind = st.kinds[0][0];
  if (typeof st.selected !== 'number' || st.selected >= st.boxes.length) st.selected = st.boxes.length - 1;
}
function commit() { props.value = JSON.parse(JSON.stringify(st)); }
function kindIndex(k) { return Math.max(0, st.kinds.findIndex((x) => x[0] === k)); }
function fmt(b) { return b.box.map((v) => v.toFixed(3)).join(', '); }

function render() {
  const w = Number(st.width) || 512, h = Number(st.height) || 512;
  stage.style.aspectRatio = `${w} / ${h}`;
  if (st.image) { img.src = st.image; img.hidden = false; } else { img.hidden = true; img.removeAttribute('src'); }
  kindSel.innerHTML = st.kinds.map((k) => `<option value="${k[0]}">${k[1]}</option>`).join('');
  kindSel.value = st.kind;
  kindSel.style.display = st.kinds.length > 1 ? '' : 'none';
  stage.querySelectorAll('.bx-box').forEach((n) => n.remove());
  st.boxes.forEach((b, i) => {
    const n = document.createElement('div');
    const sameKind = st.boxes.slice(0, i).filter((o) => o.kind === b.kind).length + 1;
    n.className = 'bx-box' + (b.kind === 'region' ? ' region' : '') + (b.enabled === false ? ' off' : '') +
      (i === st.selected ? ' sel' : '') + (b.box[1] < 0.08 ? ' low' : '');
    n.dataset.i = i;
    n.style.setProperty('--c', COLORS[(i + 3 * kindIndex(b.kind)) % COLORS.length]);
    n.style.left = (b.box[0] * 100) + '%'; n.style.top = (b.box[1] * 100) + '%';
    n.style.width = ((b.box[2] - b.box[0]) * 100) + '%'; n.style.height = ((b.box[3] - b.box[1]) * 100) + '%';
    const tag = document.createElement('span');
    tag.className = 'bx-tag';
    const name = st.kinds.length > 1 ? (st.kinds[kindIndex(b.kind)][1].split(' ')[0] + ' ') : '';
    tag.textContent = `${name}${sameKind}: ${b.label || '(no label)'}`;
    const h = document.createElement('span');
    h.className = 'bx-h';
    n.append(tag, h);
    stage.append(n);
  });
  const sel = st.boxes[st.selected];
  label.disabled = coords.disabled = onBox.disabled = delBtn.disabled = !sel;
  if (document.activeElement !== label) label.value = sel ? (sel.label || '') : '';
  if (document.activeElement !== coords) coords.value = sel ? fmt(sel) : '';
  onBox.checked = sel ? sel.enabled !== false : false;
}

function at(e) {
  const r = stage.getBoundingClientRect();
  return [clamp((e.clientX - r.left) / r.width, 0, 1), clamp((e.clientY - r.top) / r.height, 0, 1)];
}
stage.addEventListener('pointerdown', (e) => {
  if (e.button !== 0) return;
  e.preventDefault();
  const [x, y] = at(e);
  const node = e.target.closest('.bx-box');
  if (node) {
    const i = Number(node.dataset.i);
    st.selected = i;
    const b = st.boxes[i].box.slice();
    drag = {mode: e.target.classList.contains('bx-h') ? 'size' : 'move', i, x, y, b};
  } else {
    st.boxes.push({kind: st.kind, label: '', box: [x, y, x, y], enabled: true});
    st.selected = st.boxes.length - 1;
    drag = {mode: 'draw', i: st.selected, x, y};
  }
  stage.setPointerCapture(e.pointerId);
  render();
});
stage.addEventListener('pointermove', (e) => {
  if (!drag) return;
  const [x, y] = at(e);
  const b = st.boxes[drag.i];
  if (drag.mode === 'draw') {
    b.box = [Math.min(x, drag.x), Math.min(y, drag.y), Math.max(x, drag.x), Math.max(y, drag.y)];
  } else if (drag.mode === 'move') {
    const w = drag.b[2] - drag.b[0], h = drag.b[3] - drag.b[1];
    const x0 = clamp(drag.b[0] + x - drag.x, 0, 1 - w), y0 = clamp(drag.b[1] + y - drag.y, 0, 1 - h);
    b.box = [x0, y0, x0 + w, y0 + h];
  } else {
    b.box = [drag.b[0], drag.b[1], clamp(x, drag.b[0] + 0.02, 1), clamp(y, drag.b[1] + 0.02, 1)];
  }
  render();
});
function endDrag(e) {
  if (!drag) return;
  const b = st.boxes[drag.i];
  const mode = drag.mode;
  drag = null;
  if (mode === 'draw' && (b.box[2] - b.box[0] < 0.02 || b.box[3] - b.box[1] < 0.02)) {
    st.boxes.splice(st.selected, 1);  // a click, not a box
    st.selected = st.boxes.length - 1;
  } else {
    b.box = b.box.map(r4);
  }
  render();
  commit();
  if (mode === 'draw' && st.boxes[st.selected] === b) label.focus();
}
stage.addEventListener('pointerup', endDrag);
stage.addEventListener('pointercancel', endDrag);
label.addEventListener('input', () => {
  const b = st.boxes[st.selected];
  if (!b) return;
  b.label = label.value;
  render();
  commit();
});
coords.addEventListener('change', () => {
  const b = st.boxes[st.selected];
  if (!b) return;
  const n = coords.value.split(/[\s,;]+/).filter((s) => s.length).map(Number);
  if (n.length === 4 && n.every((v) => isFinite(v))) {
    const x0 = clamp(Math.min(n[0], n[2]), 0, 1), x1 = clamp(Math.max(n[0], n[2]), 0, 1);
    const y0 = clamp(Math.min(n[1], n[3]), 0, 1), y1 = clamp(Math.max(n[1], n[3]), 0, 1);
    if (x1 - x0 >= 0.01 && y1 - y0 >= 0.01) b.box = [x0, y0, x1, y1].map(r4);
  }
  render();
  commit();
});
kindSel.addEventListener('change', () => {
  st.kind = kindSel.value;
  const b = st.boxes[st.selected];
  if (b) b.kind = st.kind;  // the selected box changes kind too
  render();
  commit();
});
onBox.addEventListener('change', () => {
  const b = st.boxes[st.selected];
  if (b) { b.enabled = onBox.checked; render(); commit(); }
});
function removeSelected() {
  if (!st.boxes[st.selected]) return;
  st.boxes.splice(st.selected, 1);
  st.selected = Math.min(st.selected, st.boxes.length - 1);
  render();
  commit();
}
delBtn.addEventListener('click', removeSelected);
root.tabIndex = -1;
root.addEventListener('keydown', (e) => {
  if ((e.key === 'Delete' || e.key === 'Backspace') && e.target === root) { e.preventDefault(); removeSelected(); }
});
stage.addEventListener('pointerdown', () => root.focus({preventScroll: true}), true);
watch('value', () => { if (!drag) { load(); render(); } });
load();
render();
"""


def box_editor(value: dict | None = None, *, elem_id: str, label: str = "Boxes") -> gr.HTML:
    """The editor as a Gradio component (use inside a Blocks layout). Its value is the JSON described above."""
    return gr.HTML(value or editor_value([]), html_template='<div class="bx"></div>', css_template=_CSS,
                   js_on_load=_JS, apply_default_css=False, elem_id=elem_id, label=label, show_label=False,
                   container=False)


def editor_value(boxes: list[dict], *, width: int = 512, height: int = 512, image: str = "",
                 kinds: list[tuple[str, str]] | None = None, kind: str | None = None) -> dict:
    kinds = [list(k) for k in (kinds or [("box", "Box")])]
    return {"width": int(width), "height": int(height), "image": image or "", "kinds": kinds,
            "kind": kind or kinds[0][0], "selected": len(boxes) - 1, "boxes": boxes}


def read_boxes(value, kinds: set[str] | None = None) -> list[dict]:
    """The boxes of an editor value, checked: four finite numbers clamped into [0, 1] with x0 < x1 and y0 < y1
    (at least MIN_SIDE apart), a string label, a known kind. Anything else is dropped, never evaluated."""
    out = []
    if not isinstance(value, dict) or not isinstance(value.get("boxes"), list):
        return out
    for b in value["boxes"]:
        if not isinstance(b, dict):
            continue
        try:
            x0, y0, x1, y1 = (float(v) for v in b.get("box", ()))
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        x0, x1 = sorted((min(max(x0, 0.0), 1.0), min(max(x1, 0.0), 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), 1.0), min(max(y1, 0.0), 1.0)))
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
            continue
        kind = str(b.get("kind", ""))
        if kinds is not None and kind not in kinds:
            continue
        extra = b.get("extra") if isinstance(b.get("extra"), dict) else {}
        out.append({"kind": kind, "label": str(b.get("label") or "").strip(), "enabled": b.get("enabled") is not False,
                    "box": (round(x0, 4), round(y0, 4), round(x1, 4), round(y1, 4)), "extra": extra})
    return out


def image_data_url(image, max_side: int = 512) -> str:
    """A PIL image as a small JPEG data URL, to show behind the boxes (no file serving needed)."""
    if image is None:
        return ""
    im = image.convert("RGB")
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
