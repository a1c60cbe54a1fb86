"""Downloads from the Hugging Face hub (and from plain URLs, for rembg's models): only the files loading needs,
resumable byte by byte, checked against the hub's sha256, with progress (bytes, rate, ETA) and Stop.

What loading needs, for a diffusers pipeline repo: `model_index.json` and, for each component it names (not
the safety checker, which we never load), that folder's configs and one set of `.safetensors` weights, the
fp16 variant when the run is half precision. Nothing else from the repo's root: SD 1.5's repo also holds 4 to
8 GB single-file checkpoints there. A ControlNet, T2I-Adapter or transformers model: its root configs and
weights. A variant's weights are saved under the plain names (shard index rewritten), so the folder is an
ordinary diffusers folder every loader reads.

A model goes into the workspace. A staging folder `.<name>.download/` beside its final place fills file by
file (`<file>.part` while it arrives) and is renamed into place when complete: no picker ever lists half a
model, and a stopped or cut download continues where it stopped (an HTTP Range request).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlparse

from ..errors import UserError

CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocab/merges, sentencepiece models
SKIP_COMPONENTS = {"safety_checker"}  # pipelines load with safety_checker=None
SOURCE_FILE = ".sdstudio-source.json"  # where a downloaded folder came from, written when it completes
CHUNK = 1 << 20
DISK_MARGIN = 64 << 20  # bytes kept free beyond what the download needs
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")

    @property
    def folder_name(self) -> str:
        """The folder a download of this id goes into under models/<kind>/: org--name[@revision]."""
        return self.repo.replace("/", "--") + (f"@{self.revision.replace('/', '--')}" if self.revision else "")



def endpoint() -> str:
    """The hub's address, read at call time (HF_ENDPOINT points at a mirror, or a test's stand-in)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# -- which files loading needs ---------------------------------------------------------------------------

def _variant_of(basename: str) -> str | None:
    """'' for plain weights (`model.safetensors`, `model-00001-of-00002.safetensors`, their index), 'fp16' for
    the fp16 variant, None for anything else (non-EMA copies, other variants, other formats)."""
    if basename.endswith(".safetensors.index.json"):
        return ""
    if basename.endswith(".safetensors.index.fp16.json"):
        return "fp16"
    if not basename.endswith(".safetensors"):
        return None
    stem = _SHARD.sub("", basename[: -len(".safetensors")])
    if "." not in stem:
        return ""
    return "fp16" if stem.endswith(".fp16") and stem.count(".") == 1 else None


def weights_in(basenames: list[str], half: bool) -> list[str]:
    """One set of .safetensors weights (with its shard index) among a folder's files: the fp16 variant when
    `half` and present, else the plain set, else the fp16 set when it is all there is."""
    plain = [b for b in basenames if _variant_of(b) == ""]
    fp16 = [b for b in basenames if _variant_of(b) == "fp16"]
    has = lambda names: any(n.endswith(".safetensors") for n in names)  # noqa: E731
    if has(fp16) and (half or not has(plain)):
        return sorted(fp16)
    return sorted(plain) if has(plain) else []


def _configs(basenames: list[str]) -> list[str]:
    return sorted(b for b in basenames if b.endswith(CONFIG_SUFFIXES) and ".safetensors.index" not in b
                  and b != "model_index.json")


def select_files(names: list[str], *, half: bool = False, index: dict | None = None) -> list[str]:
    """The files of a repo that loading needs (see the module docstring). `index`: the repo's parsed
    model_index.json for a pipeline repo; None for a single-model repo (ControlNet, adapter, transformers)."""
    if index is not None:
        out = ["model_index.json"]
        comps = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                 and v[0] is not None and k not in SKIP_COMPONENTS]
        for comp in sorted(comps):
            mine = [n.split("/", 1)[1] for n in names if n.startswith(comp + "/") and n.count("/") == 1]
            out += [f"{comp}/{b}" for b in _configs(mine) + weights_in(mine, half)]
        return out
    root = [n for n in names if "/" not in n]
    return _configs(root) + weights_in(root, half)


def plain_name(name: str) -> str:
    """The name a variant file is saved under: `unet/x.fp16.safetensors` -> `unet/x.safetensors`, shards and
    index alike, so loaders need no `variant=`."""
    return (name.replace(".safetensors.index.fp16.json", ".safetensors.index.json")
            .replace(".fp16.safetensors", ".safetensors").replace(".fp16-", "-"))


# -- a plan: what to fetch, from where, to where ------------------------------------------------------------

@dataclass
class RemoteFile:
    name: str  # the path in the repo (or the URL's file name)
    url: str
    size: int | None
    sha256: str | None = None
    save_as: str = ""  # the path inside the destination (default: name)
    convert: bool = False  # a pickle .bin converted to .safetensors when it arrives (curated repos only)

    def __post_init__(self) -> None:
        self.save_as = self.save_as or self.name


@dataclass
class Plan:
    label: str  # the repo id or the URL, for messages
    dest: Path  # the final folder
    files: list[RemoteFile]
    staged: bool = True  # fill `.<dest>.download/` and rename it into place; False: files go straight into dest
    source: dict = field(default_factory=dict)  # what .sdstudio-source.json records
    headers: dict = field(default_factory=dict)
    gated: bool = False
    workspace: Path | None = None  # whose change counter to bump when done

    @property
    def staging(self) -> Path:
        return self.dest.parent / f".{self.dest.name}.download" if self.staged else self.dest

    @property
    def total(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def have(self, f: RemoteFile) -> int:
        """Bytes of `f` already on disk (done, or partly)."""
        done = self.staging / f.save_as
        if done.is_file() and not f.convert:
            return done.stat().st_size
        if f.convert and done.with_suffix(".safetensors").is_file():
            return f.size or 0
        part = _part(self.staging / f.save_as)
        return part.stat().st_size if part.is_file() else 0


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _hub_url(repo: str, revision: str, name: str) -> str:
    return f"{endpoint()}/{repo}/resolve/{quote(revision, safe='')}/{quote(name)}"


def _gated(repo: str) -> UserError:
    return UserError(f"{repo} is gated: accept its terms at {endpoint()}/{repo} while logged in, then log in here "
                     f"(`hf auth login`, or set HF_TOKEN) and try again.")


def _unknown(repo: str, tried=()) -> UserError:
    also = f" (and no local model matched: tried {'; '.join(tried)})" if tried else ""
    return UserError(f"{repo} is not on the hub, or it is private{also}: check the spelling, or log in "
                     f"(`hf auth login`) for a private repo.")


def _offline(label: str) -> UserError:
    return UserError(f"Cannot download {label}: you are offline (HF_HUB_OFFLINE is set). Unset it and connect, or "
                     f"download it elsewhere and point at its folder or .safetensors file.")


def _unreachable(label: str, exc: BaseException) -> UserError:
    host = urlparse(label if "://" in label else endpoint()).hostname or label
    return UserError(f"Cannot reach {host} to download {label} ({type(exc).__name__}): check your connection, or "
                     f"download it elsewhere and point at its folder or .safetensors file.")


def _repo_info(hub: HubId, tried=()):
    """The hub's answer about a repo (files with sizes and sha256), or one sentence saying why not."""
    if offline():
        raise _offline(str(hub))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return HfApi(endpoint=endpoint()).model_info(hub.repo, revision=hub.revision, files_metadata=True,
                                                     timeout=30)
    except GatedRepoError:
        raise _gated(hub.repo) from None
    except RevisionNotFoundError:
        raise UserError(f"{hub.repo} has no revision {hub.revision!r} on the hub: check the name after '@'.") from None
    except RepositoryNotFoundError:
        raise _unknown(hub.repo, tried) from None
    except OfflineModeIsEnabled:
        raise _offline(str(hub)) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "an error")
        raise UserError(f"The hub answered {status} about {hub.repo}: try again later.") from exc
    except Exception as exc:  # a connection refused, a DNS failure, a timeout: the transport's own errors
        raise _unreachable(str(hub), exc) from exc


def _headers() -> dict:
    try:
        from huggingface_hub.utils import build_hf_headers

        return dict(build_hf_headers())
    except Exception:  # an unreadable token file must not block public downloads
        return {}


def plan_hub(hub: HubId, dest: Path, *, kind: str = "auto", half: bool = False, files: tuple[str, ...] = (),
             convert_bin: bool = False, tried=(), workspace: Path | None = None) -> tuple[Plan, str]:
    """(the plan, the model's kind) for a hub repo: asks the hub for its file list; fetches model_index.json or
    config.json (small) when needed to tell what it is and which components it has."""
    info = _repo_info(hub, tried)
    commit = info.sha or hub.revision or "main"
    sizes = {s.rfilename: (s.size, getattr(s.lfs, "sha256", None) if s.lfs else None) for s in info.siblings or []}
    names = list(sizes)
    headers = _headers()
    gated = bool(info.gated)

    def remote(name: str, save_as: str = "", convert: bool = False) -> RemoteFile:
        size, sha = sizes.get(name, (None, None))
        return RemoteFile(name, _hub_url(hub.repo, commit, name), size, sha, save_as, convert)

    def small_json(name: str) -> dict:
        try:
            data = _get_small(_hub_url(hub.repo, commit, name), headers, gated, hub.repo)
            return json.loads(data)
        except ValueError as exc:
            raise UserError(f"{hub.repo}'s {name} is not valid JSON: the repo is broken.") from exc

    if files:  # exactly these (annotator weights, a tagger's onnx + csv)
        missing = [f for f in files if f not in sizes]
        if missing:
            raise UserError(f"{hub.repo} has no {', '.join(missing)} any more: the catalog entry is out of date.")
        chosen = [remote(f) for f in files]
    else:
        index = small_json("model_index.json") if "model_index.json" in sizes else None
        if index is not None:
            found = "checkpoint"
        elif "config.json" in sizes:
            cls = str(small_json("config.json").get("_class_name", ""))
            found = "controlnet" if "ControlNet" in cls else "t2i_adapter" if "Adapter" in cls else "model"
        else:
            found = "none"
        if kind == "auto":
            kind = found
        if found == "none" or (found == "model" and kind not in ("captioner", "model")):
            st = [n for n in names if n.endswith(".safetensors")][:3]
            hint = f" (it holds {', '.join(st)}: download one and import it in the Library)" if st else ""
            raise UserError(f"{hub.repo} is not a diffusers model, ControlNet or T2I-Adapter{hint}.")
        if kind == "checkpoint" and found != "checkpoint":
            raise UserError(f"{hub.repo} is a {found.replace('_', '-')}, not a base model: pick it as that kind.")
        picked = select_files(names, half=half, index=index)
        if not [p for p in picked if p.endswith(".safetensors")]:
            bins = [n for n in names if "/" not in n and n in ("diffusion_pytorch_model.bin", "pytorch_model.bin")]
            if convert_bin and bins and index is None:
                picked = _configs([n for n in names if "/" not in n]) + bins[:1]
            else:
                raise UserError(f"{hub.repo} has no .safetensors weights (only pickles, which can run code): SD "
                                f"Studio downloads safetensors only; look for a safetensors copy of this model.")
        chosen = [remote(p, plain_name(p), convert=p.endswith(".bin")) for p in picked]
    plan = Plan(label=str(hub), dest=Path(dest), files=chosen, staged=not files or kind != "annotators",
                source={"repo": hub.repo, "revision": hub.revision, "commit": info.sha, "kind": kind,
                        "variant": "fp16" if any(".fp16" in f.name for f in chosen) else None,
                        "files": [f.name for f in chosen]},
                headers=headers, gated=gated, workspace=workspace)
    return plan, kind


def plan_url(url: str, dest_folder: Path, save_as: str, workspace: Path | None = None) -> Plan:
    """A plan for one plain file (rembg's models are GitHub release files), saved as dest_folder/save_as."""
    if offline():
        raise _offline(url)
    size = None
    try:
        import httpx

        r = httpx.head(url, follow_redirects=True, timeout=30)
        size = int(r.headers["content-length"]) if r.status_code == 200 and "content-length" in r.headers else None
    except Exception as exc:
        raise _unreachable(url, exc) from exc
    return Plan(label=url, dest=Path(dest_folder), files=[RemoteFile(save_as, url, size)], staged=False,
                workspace=workspace)


def _get_small(url: str, headers: dict, gated: bool, repo: str) -> bytes:
    import httpx

    try:
        r = httpx.get(url, headers=headers, follow_redirects=True, timeout=30)
    except httpx.HTTPError as exc:
        raise _unreachable(repo, exc) from exc
    _check_status(r, gated, repo, url.rsplit("/", 1)[-1])
    return r.content


def _check_status(r, gated: bool, repo: str, name: str) -> None:
    if r.status_code in (200, 206):
        return
    code = r.headers.get("x-error-code", "")
    if code == "GatedRepo" or (gated and r.status_code in (401, 403)):
        raise _gated(repo)
    if code == "RepoNotFound" or r.status_code == 401:
        raise _unknown(repo)
    if r.status_code == 404:
        raise UserError(f"{repo} has no file {name} (any more): try again, or report the repo.")
    raise UserError(f"The server answered {r.status_code} for {name} of {repo}: try again later.")


# -- downloading -----------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


class _Meter:
    """Bytes done of the total, the rate over the last few seconds, the ETA: one Progress event at most every
    quarter second (and one at the end)."""

    def __init__(self, total: int, done: int, emit, label: str) -> None:
        self.total, self.done, self.emit, self.label = total, done, emit, label
        self.window: list[tuple[float, int]] = [(time.monotonic(), done)]
        self.last = 0.0

    def rate(self) -> float | None:
        (t0, b0), (t1, b1) = self.window[0], self.window[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 > 0.2 and b1 > b0 else None

    def add(self, n: int, name: str, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        self.window.append((now, self.done))
        while len(self.window) > 2 and now - self.window[0][0] > 5:
            self.window.pop(0)
        if self.emit is None or (not force and now - self.last < 0.25):
            return
        self.last = now
        from ..events import Progress

        rate = self.rate()
        eta = (self.total - self.done) / rate if rate else None
        speed = f"{human_bytes(rate)}/s" if rate else "starting"
        self.emit(Progress(self.done, max(self.total, self.done), stage="download",
                           message=f"{self.label}: {human_bytes(self.done)} of {human_bytes(self.total)} · {speed} "
                                   f"· ETA {_eta(eta)} · {name}"))


def check_disk(plan: Plan) -> None:
    """Refuse at once when the files still to fetch cannot fit (a .bin to convert needs room twice)."""
    need = sum(max(0, (f.size or 0) - plan.have(f)) + (f.size or 0 if f.convert else 0) for f in plan.files)
    where = plan.staging
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need + DISK_MARGIN > free:
        raise UserError(f"Not enough disk space for {plan.label}: it needs {human_bytes(need)} more and "
                        f"{human_bytes(free)} is free on {where}; free some space and try again.")


def download(plan: Plan, emit: Callable | None = None, check: Callable | None = None) -> Path:
    """Fetch every file of `plan` (resuming what is there), check sizes and sha256, and put the model in place.
    `check()` is called between chunks: a Stop raises there, and the partial files stay for the next time."""
    from ..events import Saved, Status

    check = check or (lambda: None)
    if plan.staged and plan.dest.exists():
        shutil.rmtree(plan.dest.parent / f".{plan.dest.name}.old", ignore_errors=True)
    check_disk(plan)
    already = sum(min(plan.have(f), f.size or 0) for f in plan.files)
    meter = _Meter(plan.total, already, emit, plan.label)
    if emit is not None:
        left = plan.total - already
        emit(Status(f"downloading {plan.label}: {len(plan.files)} files, {human_bytes(plan.total)}"
                    + (f" ({human_bytes(left)} left)" if already else ""), stage="download"))
    plan.staging.mkdir(parents=True, exist_ok=True)
    for f in plan.files:
        target = plan.staging / f.save_as
        if f.convert and target.with_suffix(".safetensors").is_file():
            continue
        if target.is_file() and (f.size is None or target.stat().st_size == f.size):
            continue
        _fetch(f, target, plan, meter, check)
        if f.convert:
            _convert_bin(target)
    meter.add(0, "done", force=True)
    if plan.staged:
        (plan.staging / SOURCE_FILE).write_text(json.dumps(plan.source, indent=2))
        _swap_into_place(plan.staging, plan.dest)
    if plan.workspace is not None:
        from ..workspace import Workspace

        Workspace(Path(plan.workspace)).note_change()
    if emit is not None:
        emit(Saved(str(plan.dest if plan.staged else plan.dest / plan.files[0].save_as), kind="download"))
    return plan.dest


def _fetch(f: RemoteFile, target: Path, plan: Plan, meter: _Meter, check: Callable, retries: int = 3) -> None:
    """One file into `target`, through `target.part`, resuming with a Range request; sha256 checked."""
    import httpx

    target.parent.mkdir(parents=True, exist_ok=True)
    part = _part(target)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.is_file() else 0
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        headers = dict(plan.headers, **({"Range": f"bytes={have}-"} if have else {}))
        try:
            with httpx.stream("GET", f.url, headers=headers, follow_redirects=True,
                              timeout=httpx.Timeout(30, read=120)) as r:
                if r.status_code == 416 and f.size is not None and have == f.size:
                    break
                _check_status(r, plan.gated, plan.label, f.name)
                if r.status_code == 200 and have:  # the server ignored the Range: start over
                    meter.add(-have, f.name)
                    have = 0
                with open(part, "ab" if have else "wb") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        check()
                        out.write(chunk)
                        meter.add(len(chunk), f.save_as)
            break
        except httpx.TransportError as exc:  # a cut connection: resume from what arrived
            if attempt == retries:
                raise UserError(f"The download of {plan.label} was cut ({type(exc).__name__}): download it again "
                                f"to continue where it stopped.") from exc
            time.sleep(1 + attempt)
    size = part.stat().st_size
    if f.size is not None and size != f.size:
        raise UserError(f"{f.name} of {plan.label} arrived with {size:,} of {f.size:,} bytes: download it again to "
                        f"continue.")
    if f.sha256:
        digest = file_sha256(part, check)
        if digest != f.sha256.lower():
            part.unlink()
            raise UserError(f"{f.name} of {plan.label} arrived damaged (its sha256 does not match the hub's): "
                            f"download it again.")
    os.replace(part, target)


def file_sha256(path: Path, check: Callable | None = None, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 4):
            if check:
                check()
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def _convert_bin(path: Path) -> None:
    """A curated repo that only has a pickle: load it with weights_only=True (no code runs) and keep only the
    .safetensors copy."""
    from ..formats.safe_io import load_state_dict, save_safetensors

    sd = load_state_dict(path, allow_pickle=True)
    save_safetensors(sd, path.with_suffix(".safetensors"))
    path.unlink()


def _rewrite_variant_index(folder: Path) -> None:
    """A saved fp16 shard index still names the variant shards: point it at the plain names they were saved as."""
    for idx in folder.rglob("*.safetensors.index.json"):
        data = json.loads(idx.read_text())
        wm = data.get("weight_map", {})
        if any(".fp16" in v for v in wm.values()):
            data["weight_map"] = {k: plain_name(v) for k, v in wm.items()}
            idx.write_text(json.dumps(data, indent=2))


def _swap_into_place(staging: Path, dest: Path) -> None:
    _rewrite_variant_index(staging)
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old"
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- what callers use ------------------------------------------------------------------------------------

def is_complete(dest: Path, kind: str) -> bool:
    """Whether a downloaded model is in place (the staging folder is renamed only when complete)."""
    if kind == "checkpoint":
        return (dest / "model_index.json").is_file()
    return (dest / "config.json").is_file() or (dest / SOURCE_FILE).is_file()


def fetch_model(hub: HubId, dest: Path, *, kind: str = "checkpoint", half: bool = False, emit=None, check=None,
                tried=(), files: tuple[str, ...] = (), convert_bin: bool = False) -> Path:
    """The local folder of a hub model, downloading it into `dest` first when it is not there (only the files
    loading needs). `dest` is models/<kind>/<org--name> in a workspace, whose change counter is bumped."""
    dest = Path(dest)
    if not files and is_complete(dest, kind):
        return dest
    workspace = dest.parent.parent.parent if dest.parent.parent.name == "models" else None
    plan, _ = plan_hub(hub, dest, kind=kind, half=half, files=files, convert_bin=convert_bin, tried=tried,
                       workspace=workspace)
    return download(plan, emit, check)


def source_of(folder: Path) -> dict:
    """What a downloaded folder records about where it came from ({} for anything else)."""
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
