"""sweeper.provenance: the params that say which data a trial read."""

from __future__ import annotations

from sweeper.provenance import data_params


def test_trial_params_carry_the_provenance_and_the_evaluated_sizes(rt_dir):
    values = {"output_dir": "unused", "data": {"path": str(rt_dir)},
              "eval": {"max_examples": 16, "splits": ["test", "validation"]}}
    params = dict(data_params(values))
    assert params["data.origin"] == f"data.path={rt_dir}" and params["data.format"] == "cornell"
    assert params["data.resolved_path"] == str(rt_dir.resolve()) and len(params["data.sha256"]) == 64
    assert params["data.files"] == "rt-polarity.neg,rt-polarity.pos" and "data.skipped_lines" not in params
    assert params["data.test_size"] == "1066" and params["data.test_evaluated"] == "16"
    assert params["data.validation_evaluated"] == "16"
    # No data: no provenance, and no error here (the trial itself fails, naming the folder).
    assert data_params({**values, "data": {"path": str(rt_dir / "missing")}}) == []


def test_skipped_lines_are_recorded_when_there_are_any(tmp_path):
    lines = [b'{"text": "a joy", "label": 1}', b'{"text": "a bore", "label": 0}', b"{bad"]
    lines += [b'{"text": "more", "label": 1}'] * 30
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "validation.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": "flat", "label": 0}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "dull", "label": 0}\n{"text": "warm", "label": 1}\n')
    values = {"output_dir": "unused", "data": {"path": str(tmp_path), "on_bad_line": "skip"}}
    params = dict(data_params(values))
    assert params["data.skipped_lines"] == "1" and params["data.train_size"] == "32"
    assert params["data.format"] == "jsonl" and params["data.test_evaluated"] == "2"
