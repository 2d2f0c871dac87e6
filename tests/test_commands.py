"""The small CLI commands: info, crop, demo."""

import importlib.util

import numpy as np
import pytest

from marlin import Marlin
from marlin.cli import main as cli
from marlin.video.io import probe_video, read_video
from marlin.video.windows import n_windows

HAS_FACE = importlib.util.find_spec("mediapipe") is not None
skip_no_face = pytest.mark.skipif(not HAS_FACE, reason="needs the [face] extra")


def test_info_lists_models_and_describes_a_checkpoint(tmp_path, capsys):
    assert cli(["info"]) == 0
    assert "marlin_vit_base_ytf" in capsys.readouterr().out
    Marlin("marlin_vit_tiny_test", as_feature_extractor=False).export_official(tmp_path / "t.full.pt")
    assert cli(["info", str(tmp_path / "t.full.pt")]) == 0
    out = capsys.readouterr().out
    assert "format official, variant marlin_vit_tiny_test, full" in out


def test_no_command_prints_help(capsys):
    assert cli([]) == 2
    assert "extract" in capsys.readouterr().out


@pytest.mark.face
@skip_no_face
def test_crop_writes_centred_square_videos(tmp_path, capsys):
    from marlin.viz.sample import make_sample_clip

    (tmp_path / "in").mkdir()
    make_sample_clip(tmp_path / "in" / "face.mp4", n_frames=30)
    (tmp_path / "in" / "bad.mp4").write_text("no video")
    rc = cli(["crop", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--size", "112", "--no-progress"])
    assert rc == 1  # one input failed
    info = probe_video(tmp_path / "out" / "face.mp4")
    assert (info.width, info.height, info.n_frames) == (112, 112, 30)
    crops = read_video(tmp_path / "out" / "face.mp4").astype(float)
    # the crop is the face, not the background: skin-toned centre, no flat background colour dominating
    centre = crops[:, 40:72, 40:72].mean(axis=(0, 1, 2))
    assert centre[0] > centre[2], centre  # reddish skin, not the bluish backdrop
    assert "bad.mp4: not a video file" in capsys.readouterr().err
    assert cli(["crop", str(tmp_path / "in" / "face.mp4"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.face
@skip_no_face
def test_demo_runs_end_to_end_offline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "-o", str(out), "--model", "marlin_vit_tiny_test"]) == 0
    text = capsys.readouterr().out
    assert "untrained" in text and "report:" in text
    assert (out / "preview" / "sample_face.png").is_file()
    feats = np.load(out / "features" / "sample_face.npy")
    assert feats.shape == (n_windows(75, clip_frames=4), 32) and np.isfinite(feats).all()
    assert "features:" in (out / "report.txt").read_text()


def test_expected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    """Unknown model, a pickle that needs code execution, an impossible mask ratio: one line naming what is wrong,
    exit code 2 (they used to be 16-24 line tracebacks); --debug / MARLIN_DEBUG=1 give the traceback back."""
    from videogen import write_video

    video = write_video(tmp_path / "v.mp4", 4, 32, 32)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x05true"
                     b"\x94\x85\x94R\x94.")  # os.system("true"), pickled: must be refused, never run  # fmt: skip
    cases = [
        (["extract", str(video), "-o", str(tmp_path / "o"), "--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["extract", str(video), "-o", str(tmp_path / "o"), "--model", str(evil)], "refused to unpickle"),
        (["masks", str(video), "--mask-ratio", "1.0", "--strategy", "tube", "-o", str(tmp_path / "m.png")],
         "mask_ratio must be in [0, 1)"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"marlin {argv[0]}: ") and message in err[0], err
    with pytest.raises(ValueError, match="unknown model"):
        cli(["--debug", *cases[0][0]])
    monkeypatch.setenv("MARLIN_DEBUG", "1")
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        cli(cases[2][0])


@pytest.mark.parametrize("debug", [False, True])
def test_cli_warnings_are_one_line_unless_debugging(tmp_path, debug):
    """A damaged video warns in one line ("VideoWarning: ... decoded 17 of 40 frames"), without Python's source line."""
    import os
    import subprocess
    import sys

    from videogen import truncate, write_video

    clip = truncate(write_video(tmp_path / "full.mp4", 40, 32, 32, faststart=True), tmp_path / "cut.mp4", 0.5)
    env = {k: v for k, v in os.environ.items() if k != "MARLIN_DEBUG"} | ({"MARLIN_DEBUG": "1"} if debug else {})
    argv = [sys.executable, "-m", "marlin.cli", "extract", str(clip), "-o", str(tmp_path / "o"), "--model",
            "marlin_vit_tiny_test", "--random-init", "--resize", "--workers", "0", "--no-progress"]  # fmt: skip
    err = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stderr
    lines = err.splitlines()
    warned = [i for i, line in enumerate(lines) if "VideoWarning" in line]
    assert warned, err
    source_lines = [lines[i + 1] for i in warned if i + 1 < len(lines) and lines[i + 1].startswith("  ")]
    assert bool(source_lines) == debug, err
