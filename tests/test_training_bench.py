"""Training benchmark on CPU with the tiny debug hybrid: runs the trainer's own step for each variant."""

from flarectl.training.bench import run_training_benchmark


def test_training_benchmark_debug_cpu():
    res = run_training_benchmark("debug-hybrid", recipe="debug", variants=("flare-reference", "ar"), seq_len=32,
                                 micro_batch_size=1, steps=1, warmup=0, doc_len=16, prompt_len=4, log=lambda s: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"flare-reference", "ar"}
    f, a = rows["flare-reference"], rows["ar"]
    assert "error" not in f and "error" not in a
    assert a["tokens_per_step"] == a["clean_tokens_per_step"] == 32
    # flare row: clean stream + two complementary views of the response windows
    assert f["clean_tokens_per_step"] == 32 and f["tokens_per_step"] > 2 * 32
    assert f["loss"] > 0 and a["loss"] > 0 and f["mfu"] is None
    s = {x["variant"]: x for x in res["summary"]}
    assert abs(s["ar"]["tokens_per_second_vs_ar"] - 1) < 1e-9


def test_bench_train_cli_writes_json_and_png(tmp_path):
    import json

    from typer.testing import CliRunner

    from flarectl.cli import app

    res = CliRunner().invoke(app, ["bench", "train", "--allow-cpu", "--model", "debug-hybrid", "--recipe", "debug",
                                   "--variant", "ar", "--seq-len", "16", "--micro-batch-size", "1", "--steps", "1",
                                   "--warmup", "0", "--doc-len", "16", "--prompt-len", "2", "--profile", "--out",
                                   str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "training.json").read_text())
    assert doc["rows"][0]["variant"] == "ar" and doc["rows"][0]["tokens_per_step"] == 16
    assert (tmp_path / "training.png").stat().st_size > 0
    assert "Self CPU" in (tmp_path / "training_profile_ar.txt").read_text()
