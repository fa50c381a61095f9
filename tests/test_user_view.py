"""What a user sees while a stage runs: its summary line, TRL's log lines, and a stage that stops loudly when a
rule drops most of its rows (issue 25)."""

import json
import logging

import pytest
from transformers import TrainerState

from posttrain import cli, io, modeling, plots, progress, training
from stages import generate, prepare, sft
from tests.conftest import tiny_params

U = {"role": "user", "content": "What is 2 + 2?"}


def test_summary_puts_counts_first_and_leaves_intervals_to_mlflow():
    metrics = {"train_loss": 0.69314, "rows": 154, "pass_rate_ci": (0.1, 0.2), "heldout_accuracy_initial": 0.5,
               "dropped_too_long": 166, "backend": "hf", "passed_through": True, "peak_rss_mb": 900.0}
    assert cli.summary("sft", metrics, 149.04) == (
        "sft done in 149.0 s: rows 154, dropped_too_long 166, train_loss 0.6931, backend hf")
    many = {f"m{i}": float(i) for i in range(12)}
    assert cli.summary("x", many, 1.0, limit=2) == "x done in 1.0 s: m0 0, m1 1 (+10 more in MLflow)"
    assert cli.summary("base", {}, 0.25) == "base done in 0.2 s"


def test_check_drops_logs_under_the_share_and_stops_over_it(caplog):
    with caplog.at_level(logging.WARNING, logger="posttrain.io"):
        io.check_drops("f.jsonl", 4, {"too_long": 1, "empty": 1}, 0.5, "raise x")  # 2 of 4: at the share, kept
    assert caplog.messages == ["f.jsonl: 2 of 4 rows dropped (empty 1, too_long 1)"]
    with pytest.raises(io.InputError, match=r"^f\.jsonl: 3 of 4 rows dropped \(too_long 3\): more than "
                                            r"common\.max_drop_share=0\.5 of them; raise x$"):
        io.check_drops("f.jsonl", 4, {"too_long": 3}, 0.5, "raise x")
    io.check_drops("f.jsonl", 4, {"too_long": 0}, 0.0, "raise x")  # nothing dropped: silent even at share 0


def test_sft_stops_when_most_demos_exceed_max_len_and_names_the_length_needed(workdir, tmp_path):
    rows = [{"id": "short", "messages": [U, {"role": "assistant", "content": "4"}]}] + [
        {"id": f"long{i}", "messages": [U, {"role": "assistant", "content": "four " * (20 + 10 * i)}]}
        for i in range(3)]
    data = tmp_path / "sft.jsonl"
    io.write_jsonl(data, rows)
    tok = modeling.stage_tokenizer(workdir / "models" / "base", padding_side="right")
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert lengths[0] < min(lengths[1:])
    params = tiny_params(tmp_path, common={"max_len": lengths[0]})
    with pytest.raises(SystemExit, match=rf"{data}: 3 of 4 rows dropped \(too_long 3\): more than "
                                         rf"common.max_drop_share=0.5 of them; raise common.max_len from "
                                         rf"{lengths[0]} to {max(lengths)} to keep every row"):
        sft.main(["--params", str(params), "--model", str(workdir / "models" / "base"), "--data", str(data),
                  "--out", str(tmp_path / "sft")])
    assert not (tmp_path / "sft").exists()


def test_prepare_stops_when_most_of_a_users_rows_are_dropped(tmp_path):
    src = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": "Same.", "rejected": "Same."} for i in range(3)]
    src.write_text("\n".join(json.dumps(r) for r in rows + [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}]))
    params = tiny_params(tmp_path, prepare={"source": str(src)})
    with pytest.raises(SystemExit, match=rf"{src}: 3 of 4 rows dropped \(chosen_equals_rejected 3\): more than "
                                         r"common.max_drop_share=0.5"):
        prepare.main(["--params", str(params), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("samples", "stops"), [(["", "", "", "4"], True), (["", "4", "5", "4"], False)])
def test_generate_stops_when_most_samples_are_empty(workdir, tmp_path, monkeypatch, samples, stops):
    prompts = tmp_path / "train.jsonl"
    io.write_jsonl(prompts, [{"id": f"p{i}", "task": "add", "messages": [U], "verifier": None} for i in range(2)])
    monkeypatch.setattr(generate.sampling, "sample", lambda model, tok, p, **kw: [list(samples) for _ in p])
    argv = ["--params", str(tiny_params(tmp_path)), "--model", str(workdir / "models" / "base"), "--prompts",
            str(prompts), "--out", str(tmp_path / "samples.jsonl")]
    if stops:
        with pytest.raises(SystemExit, match=r"samples.jsonl: 6 of 8 rows dropped \(empty_sample 6\): more than "
                                             r"common.max_drop_share=0.5 of them; the policy ends its turn at once"):
            generate.main(argv)
    else:
        assert generate.main(argv)["samples"] == 8


def test_trainer_logs_one_fixed_width_line_per_logging_step(capsys):
    line = training.LogLine("dpo@dpo")
    state = TrainerState(global_step=0, max_steps=40)
    line.on_train_begin(None, state, None)
    state.global_step = 8
    line.on_log(None, state, None, logs={"loss": 0.693147, "learning_rate": 1e-4, "epoch": 0.2,
                                         "rewards/margins": -0.01234})
    out = capsys.readouterr().out
    assert out.startswith("dpo@dpo step  8/40  loss    0.6931  learning_rate    0.0001  rewards/margins  -0.01234  [")
    assert out.endswith("left]\n") and out.count("\n") == 1


def test_label_column_keeps_the_gap_and_the_range():
    assert plots.label_column([0.5, 0.5, 0.5], 0.1) == pytest.approx([0.5, 0.4, 0.3])
    assert plots.label_column([0.02, 0.0], 0.1) == pytest.approx([0.1, 0.0])  # pushed up from the bottom
    assert plots.label_column([0.9, 0.1], 0.1) == pytest.approx([0.9, 0.1])  # far apart: at their points
    assert plots.label_column([0.5] * 11, 0.2) == pytest.approx([1 - i / 10 for i in range(11)])  # too many: even


def test_report_pictures_fit_a_screen_and_their_labels_do_not_overlap(tmp_path):
    from matplotlib.image import imread

    # 16 models as the default table has them, 12 within 2 points of each other near the top left
    table = {f"m{i:02d}": {"pass_rate": 0.5 + 0.001 * i, "pass_rate_ci": [0.43, 0.57], "alignment_tax": -0.012,
                           "win_rate_vs_sft": 0.55, "win_rate_vs_sft_ci": [0.5, 0.6]} for i in range(12)}
    table |= {n: {"pass_rate": p, "pass_rate_ci": [p - 0.05, p + 0.05], "alignment_tax": t, "win_rate_vs_sft": 0.4,
                  "win_rate_vs_sft_ci": [0.3, 0.5]} for n, p, t in
              [("base", 0.14, 0.0), ("sft", 0.44, 0.0), ("ipo", 0.22, -0.012), ("tgdpo_cancel_token", 0.3, 0.01)]}
    names = list(table)
    panels = [("pass_rate", "gold pass rate"), ("win_rate_vs_sft", "win rate vs sft")]
    plots.scores(table, names, panels, tmp_path / "scores.png", shipped="m11")
    texts = plots.pareto(table, names, "sft", "m11", tmp_path / "pareto.png")
    for name in ("scores.png", "pareto.png"):
        height, width = imread(tmp_path / name).shape[:2]
        assert width <= 2000 and height <= 2000, (name, width, height)
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t) for t in texts]  # the name alone (an Annotation's box takes in its line)
    assert len(boxes) == 16 and "m11 (ship)" in [t.get_text() for t in texts]
    overlapping = [(texts[i].get_text(), texts[j].get_text()) for i in range(16) for j in range(i + 1, 16)
                   if boxes[i].overlaps(boxes[j])]
    assert not overlapping


def test_run_says_stage_k_of_n_and_the_time_left_from_the_last_runs_times():
    from posttrain import run

    stages = ["prepare", "base", "sft", "report"]
    own, prior = {"prepare": 3.0, "base": 20.0, "sft": 100.0}, {"sft": 70.0, "report": 5.0}
    assert run.estimate(stages[2:], own, prior) == (105.0, 1, 1)  # sft's own 100 s, report's benchmark 5 s
    assert run.line(["prepare", "base", "sft"], stages, 23.4, own, prior, "Intel Xeon") == (
        "[posttrain] stage 3 of 4: sft; 0m23s spent, ~1m45s left (partly timed on Intel Xeon)")
    assert run.line(["prepare"], stages, 0, own, {}, None) == (
        "[posttrain] stage 1 of 4: prepare; 0m00s spent, ~2m03s left (last run's times, 1 stages untimed)")
    assert run.line(["prepare", "merge@x"], stages, 5, {}, {}, None) == (  # a stage DVC ran unforeseen counts too
        "[posttrain] stage 2 of 5: merge@x; 0m05s spent, no stage times yet")
    assert progress.clock(3725) == "1h02m" and progress.clock(125.4) == "2m05s"
