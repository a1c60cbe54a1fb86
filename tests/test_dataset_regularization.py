"""Class images for prior preservation: `sdstudio regularize --model tiny` writes N images, resumes, stops."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdstudio.cli import main
from sdstudio.events import Progress


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_regularize_cli_writes_n_and_resumes(tmp_path, tiny_dir, capsys):
    out = tmp_path / "reg"
    args = ["regularize", "--model", "tiny", "--class-word", "dog", "--out", str(out), "--steps", "2", "--size", "64"]
    assert main([*args, "--count", "2"]) == 0
    assert _pngs(out) == ["class_00000.png", "class_00001.png"]
    with Image.open(out / "class_00001.png") as im:
        assert im.size == (64, 64)
    second = (out / "class_00001.png").read_bytes()
    assert "2 new class images" in capsys.readouterr().out
    # Resume: one deleted, one more asked for -> two made, the rest untouched; the same seed gives the same image.
    (out / "class_00001.png").unlink()
    mtime = (out / "class_00000.png").stat().st_mtime_ns
    assert main([*args, "--count", "3"]) == 0
    assert len(_pngs(out)) == 3
    assert (out / "class_00000.png").stat().st_mtime_ns == mtime
    assert (out / "class_00001.png").read_bytes() == second
    assert "2 new class images, 3 in total" in capsys.readouterr().out
    # Everything there already: nothing loads, nothing is written.
    assert main([*args, "--count", "3"]) == 0
    assert "0 new class images" in capsys.readouterr().out


def test_regularize_into_dataset_folder(tmp_path, tiny_dir, capsys):
    ds = tmp_path / "ds"
    (ds / "img" / "10_sks dog").mkdir(parents=True)
    assert main(["regularize", "--model", "tiny", "--class-word", "dog", "--count", "1", "--out", str(ds),
                 "--steps", "1", "--size", "64"]) == 0
    assert _pngs(ds / "reg" / "1_dog") == ["class_00000.png"]
    assert main(["regularize", "--model", "tiny", "--class-word", " ", "--count", "1", "--out", str(ds)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")


def test_regularize_job_stops_and_resumes(tmp_path, tiny_components):
    from sdstudio.data.regularization import RegularizationConfig, generate_class_images
    from sdstudio.jobs import JobManager

    out = tmp_path / "reg"
    cfg = RegularizationConfig(class_word="cat", count=4, steps=1, size=64)
    jobs = JobManager()

    def stop_after_first(ev):
        if isinstance(ev, Progress) and ev.done == 1:
            job.stop()

    job = jobs.start("reg", "regularize", lambda ctx: generate_class_images(tiny_components, cfg, out, ctx.emit,
                                                                            ctx.commands.check),
                     listeners=[stop_after_first])
    job.join(120)
    assert job.state == "stopped"
    assert _pngs(out) == ["class_00000.png"]
    job = jobs.start("reg", "regularize", lambda ctx: generate_class_images(tiny_components, cfg, out, ctx.emit,
                                                                            ctx.commands.check))
    job.join(120)
    assert job.state == "finished" and len(job.result) == 3 and len(_pngs(out)) == 4
    assert job.log.snapshot()["progress"][:2] == (4, 4)


def test_import_class_folder(tmp_path, capsys):
    src = tmp_path / "classes"
    src.mkdir()
    Image.new("RGB", (80, 80), (1, 2, 3)).save(src / "one.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "reg"
    assert main(["regularize", "--class-word", "dog", "--out", str(out), "--import-from", str(src)]) == 0
    assert _pngs(out) == ["one.png"]
    assert "skipped broken.png" in capsys.readouterr().out
