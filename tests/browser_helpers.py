"""Helpers the browser tests share: typing into Gradio fields the way a user does, reading every field of a form
back, and comparing the Train tab's form with a run's config.toml field by field."""
from __future__ import annotations

import time
from pathlib import Path

# Reads what a Gradio component shows: a checkbox's state, a radio's checked value, a textbox, a number, a
# dropdown's text (its choice's label).
_READ = """(id) => {
  const root = document.getElementById(id);
  if (!root) return null;
  const radios = root.querySelectorAll('input[type=radio]');
  if (radios.length) { const c = [...radios].find(r => r.checked); return c ? c.value : null; }
  const cb = root.querySelector('input[type=checkbox]');
  if (cb) return cb.checked;
  const ta = root.querySelector('textarea');
  if (ta) return ta.value;
  const inp = root.querySelector('input[type=number]') || root.querySelector('input:not([type=range]):not([type=file])');
  return inp ? inp.value : null;
}"""


def fill(page, elem_id: str, value) -> None:
    """Type into a textbox or number and Tab away: Gradio Numbers commit on blur."""
    box = page.locator(f"#{elem_id} input[type=number], #{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def pick(page, elem_id: str, value: str) -> None:
    """Choose a dropdown value by typing it and pressing Enter."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    box.press("Enter")


def read(page, elem_id: str):
    return page.evaluate(_READ, elem_id)


def read_all(page, elem_ids) -> dict:
    return {e: read(page, e) for e in elem_ids}


def wait_for_values(page, expected: dict, timeout: float = 20.0) -> dict:
    """Wait until every field shows its expected value (what a reload restores arrives after the page); returns
    the fields that still differ (empty when all match)."""
    end = time.time() + timeout
    while True:
        diff = {k: (read(page, k), v) for k, v in expected.items() if read(page, k) != v}
        if not diff or time.time() > end:
            return diff
        page.wait_for_timeout(250)


def wait_for_same(page, expected: dict, timeout: float = 20.0) -> dict:
    """wait_for_values, comparing as same_value does (a number shown as "0.5" is 0.5)."""
    end = time.time() + timeout
    while True:
        diff = {k: (read(page, k), v) for k, v in expected.items() if not same_value(read(page, k), v)}
        if not diff or time.time() > end:
            return diff
        page.wait_for_timeout(250)


def open_accordions(page, container: str, labels) -> None:
    """Open Gradio accordions (their inputs mount only when open)."""
    for label in labels:
        page.locator(container).get_by_text(label, exact=True).first.click()
    page.wait_for_timeout(300)


def train_form_ids(config: dict) -> dict:
    """{elem_id: expected shown value} for every field of the Train tab that a run's config.toml sets."""
    hidden = {"output_dir", "schema_version", "device"}
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            if key != config.get("method"):
                continue
            for sub, v in value.items():
                out["train-" + f"{key}-{sub}".replace("_", "-")] = v
        elif key not in hidden:
            out["train-" + key.replace("_", "-")] = value
    out["train-base"] = out.pop("train-base-model")
    return out


def same_value(shown, expected) -> bool:
    if isinstance(expected, bool):
        return shown is expected
    if isinstance(expected, list):
        return [x for x in str(shown or "").splitlines() if x.strip()] == expected
    if isinstance(expected, (int, float)):
        try:
            return abs(float(shown) - float(expected)) <= 1e-9 * max(1.0, abs(float(expected)))
        except (TypeError, ValueError):
            return False
    return str(shown) == str(expected)


def train_form_differences(page, config: dict, home: Path) -> dict:
    """Fields of the Train tab that do not show the run's config.toml value: {elem_id: (shown, expected)}."""
    diff = {}
    for elem_id, expected in train_form_ids(config).items():
        shown = read(page, elem_id)
        if elem_id == "train-base" and expected == "tiny":
            ok = str(shown).startswith("tiny")  # the dropdown shows the choice's label, "tiny (offline demo, ...)"
        else:
            ok = same_value(shown, expected)
        if not ok:
            diff[elem_id] = (shown, expected)
    return diff


def hide_toasts(page) -> None:
    """Hide Gradio's toasts for a screenshot (clicking their close buttons raced their fade-out in CI)."""
    page.add_style_tag(content=".toast-wrap, .toast-body { display: none !important; }")


CLIPPED_JS = """(rootSel) => {
  // Texts a user cannot read whole at this width: an input whose value is wider than its box (a dropdown's arrow
  // covers its right end), or a text cut by an ancestor that hides overflow (a slider's maximum).
  const out = [];
  const canvas = document.createElement('canvas').getContext('2d');
  const root = document.querySelector(rootSel);
  for (const el of root.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height) continue;
    const cs = getComputedStyle(el);
    if (el.tagName === 'INPUT' && !['range', 'checkbox', 'file', 'radio'].includes(el.type)) {
      canvas.font = cs.font;
      const w = canvas.measureText(el.value || '').width + parseFloat(cs.paddingLeft) + parseFloat(cs.paddingRight);
      const wrap = el.closest('.wrap-inner');
      const room = el.clientWidth - (wrap && wrap.querySelector('.icon-wrap, svg') ? 22 : 0);
      if (w > room + 1) out.push([el.closest('[id]')?.id, el.value]);
      continue;
    }
    if (el.children.length || !el.textContent.trim()) continue;
    const range = document.createRange(); range.selectNodeContents(el);
    const tr = range.getBoundingClientRect();
    for (let a = el; a && a !== root; a = a.parentElement) {
      const acs = getComputedStyle(a);
      if (acs.overflowX === 'visible') continue;
      const ar = a.getBoundingClientRect();
      if (tr.right > ar.right + 1 || tr.left < ar.left - 1) { out.push([el.closest('[id]')?.id, el.textContent.trim()]); break; }
    }
  }
  return out;
}"""


def clipped_texts(page, root: str) -> list:
    return page.evaluate(CLIPPED_JS, root)
