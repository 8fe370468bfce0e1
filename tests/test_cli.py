"""The `vta-sam` front: every stage reachable with the same options as its make target."""

from __future__ import annotations

import json

from vta_sam.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_one_clear_error(capsys):
    assert main(["featurez"]) == 2
    assert "unknown command 'featurez'" in capsys.readouterr().err


def test_features_dry_run_prints_the_resolved_config(tmp_path, capsys):
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"x")
    assert main(["features", "--videos", str(videos), "--out", str(tmp_path / "o"), "--fps", "3", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["fps"] == 3.0 and printed["spec"]["num_frames"] == round(10.24 * 3) and printed["clips"] == 1
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_verify_goes_to_the_shards_tool(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert "meta.json: missing" in capsys.readouterr().out


def test_a_value_the_config_refuses_is_one_line(tmp_path, capsys):
    assert main(["features", "--videos", str(tmp_path), "--fps", "-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: fps and window_seconds must be positive"
