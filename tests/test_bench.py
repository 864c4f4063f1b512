"""``flarectl bench``: the serving benchmark and step-cost mode on a tiny model, and their one-line errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from flarectl.cli import app
from flarectl.engine import bench
from flarectl.errors import FlareError


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_serving_benchmark_cli_writes_table_json_png(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--model", "debug-hybrid", "--mode", "ar,ar-trust", "--concurrency",
                                   "1,2", "--num-requests", "3", "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert [(p["mode"], p["concurrency"]) for p in data["points"]] == [
        ("ar", 1), ("ar-trust", 1), ("ar", 2), ("ar-trust", 2)]
    for p in data["points"]:
        assert p["tokens"] == 9 and p["failed"] == 0 and p["tokens_per_second"] > 0
        assert p["ttft_p99_ms"] >= p["ttft_p50_ms"] > 0
    assert [b["concurrency"] for b in data["baseline"]] == [1, 2] and data["baseline"][0]["tokens"] == 3
    assert data["points"][1]["acceptance"] is not None and data["weights"] == "RANDOM weights"
    assert all(p["gpu_step_ms"] is None for p in data["points"])  # no CUDA graphs on CPU: no GPU floor
    assert all(p["overlapped_steps"] == 0 for p in data["points"])
    # off until timed on a GPU
    assert not data["engine"]["greedy_read"] and not data["engine"]["overlap"] and not data["engine"]["row_copy_kernel"]


def test_step_shapes_are_counted_and_floored_only_with_graphs():
    """``count_step_shapes`` sees every forward's (Wc, Ww); ``gpu_floor_ms`` averages each shape's graph replay over
    them (here a stand-in for the replay timer) and is None without graphs."""
    from flarectl.engine import Engine, Request
    from flarectl.models.loading import load_model

    m = load_model("debug-hybrid", dtype="float32", device="cpu", seed=1)
    engine = Engine(m, concurrency=2, capacity=64, mask_token_id=258, block_size=3)
    shapes = bench.count_step_shapes(engine)
    engine.submit(Request([5, 6, 7], "ar", max_new_tokens=4, stop_ids=[]))
    engine.submit(Request([8, 9], "ar-trust", max_new_tokens=5, stop_ids=[]))
    engine.run()
    assert sum(shapes.values()) == engine.steps > 0  # prefill runs outside ``backend.step``
    assert all(wc >= 1 and ww in (0, 3) for wc, ww in shapes) and any(ww == 3 for _, ww in shapes)
    assert bench.gpu_floor_ms(engine, shapes) is None  # CPU: no graphs

    class Graphed:
        graphs = {k: None for k in shapes}

    engine.backend._step = Graphed()
    cost = {k: 1.0 + k[0] + 10 * k[1] for k in shapes}
    real = bench.graph_replay_ms
    try:
        bench.graph_replay_ms = lambda graphed, key, repeats=20: cost[key]
        want = sum(cost[k] * n for k, n in shapes.items()) / sum(shapes.values())
        assert bench.gpu_floor_ms(engine, shapes) == pytest.approx(want)
        assert bench.gpu_floor_ms(engine, {(9, 9): 1}) is None  # a shape never captured
    finally:
        bench.graph_replay_ms = real


def test_serving_loop_switches_reach_the_engine(tmp_path):
    """--overlap, --greedy-read and --row-copy-kernel reach the engine (recorded in the JSON as they acted; the module
    defaults are restored after) and every request completes, the trust modes overlapped too."""
    from flarectl.engine import modes, row_copy

    res = CliRunner().invoke(app, ["bench", "--model", "debug-hybrid", "--mode", "ar,ar-trust,diffusion-trust",
                                   "--concurrency", "2", "--num-requests", "3", "--max-new-tokens", "4",
                                   "--no-baseline", "--overlap", "--greedy-read", "--row-copy-kernel",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["engine"]["overlap"] is True and data["engine"]["greedy_read"] is True
    assert data["engine"]["row_copy_kernel"] is False  # recorded as it acted: the copy kernel runs on CUDA only
    assert [(p["mode"], p["tokens"], p["failed"]) for p in data["points"]] == [
        ("ar", 12, 0), ("ar-trust", 12, 0), ("diffusion-trust", 12, 0)]
    assert all(0 < p["overlapped_steps"] <= p["steps"] for p in data["points"])
    assert modes.GREEDY_READ is None and row_copy.KERNEL is None  # the defaults (on CUDA) are back


def test_serving_benchmark_diffusion_scheme(tmp_path):
    """--diffusion-scheme anchored reaches the engine (recorded in the JSON) and every request completes."""
    res = CliRunner().invoke(app, ["bench", "--model", "debug-hybrid", "--mode", "diffusion-trust", "--concurrency",
                                   "2", "--num-requests", "3", "--max-new-tokens", "5", "--no-baseline",
                                   "--diffusion-scheme", "anchored", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["engine"]["diffusion_trust_scheme"] == "anchored"
    assert [(p["mode"], p["tokens"], p["failed"]) for p in data["points"]] == [("diffusion-trust", 15, 0)]


def test_step_cost_cli(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--model", "debug-llama", "--step-cost", "--concurrency", "2",
                                   "--context", "8", "--block-size", "2", "--no-compile", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "step_cost_torch.json").read_text())
    assert [(s["kind"], s["width_clean"], s["width_window"]) for s in data["steps"]] == [
        ("ar", 1, 0), ("trust", 2, 2), ("window", 0, 2)]
    assert data["weight_bytes"] > 0 and all(s["ms"] > 0 for s in data["steps"])


def test_step_cost_projects_throughput_from_a_converted_checkpoints_bench(tmp_path):
    """--tpf-from (repeatable): tokens/forward of each serving bench.json x the step times = one projected tok/s
    table per prompt set (labelled), in the order given."""
    src, other = tmp_path / "converted.json", tmp_path / "converted_code.json"
    src.write_text(json.dumps({"model": "conv", "weights": "trained weights", "prompts": "gsm8k", "points": [
        {"mode": "ar", "concurrency": 2, "tokens_per_forward": 1.0},
        {"mode": "ar-trust", "concurrency": 2, "tokens_per_forward": 2.5},
        {"mode": "diffusion-trust", "concurrency": 8, "tokens_per_forward": 3.0}]}))  # no C=8 step: skipped
    other.write_text(json.dumps({"model": "conv", "prompts": "humaneval", "points": [
        {"mode": "ar-trust", "concurrency": 2, "tokens_per_forward": 1.5}]}))
    res = CliRunner().invoke(app, ["bench", "--model", "debug-llama", "--step-cost", "--concurrency", "2",
                                   "--context", "4", "--block-size", "2", "--no-compile", "--tpf-from", str(src),
                                   "--tpf-from", str(other), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.output.count("projection, not a measurement") == 2
    data = json.loads((tmp_path / "step_cost_torch.json").read_text())
    ms = {s["kind"]: s["ms"] for s in data["steps"]}
    first, second = data["projected"]
    rows = {r["mode"]: r for r in first["rows"]}
    assert set(rows) == {"ar", "ar-trust"} and first["source_model"] == "conv" and first["prompts"] == "gsm8k"
    assert rows["ar-trust"]["step"] == "trust" and rows["ar"]["step"] == "ar"
    assert rows["ar-trust"]["tokens_per_second"] == pytest.approx(1000 * 2 * 2.5 / ms["trust"])
    assert rows["ar"]["tokens_per_second"] == pytest.approx(1000 * 2 / ms["ar"])
    assert second["prompts"] == "humaneval" and [r["mode"] for r in second["rows"]] == ["ar-trust"]
    assert second["rows"][0]["tokens_per_second"] == pytest.approx(1000 * 2 * 1.5 / ms["trust"])


def test_step_cost_projection_adds_the_serving_loops_host_time(tmp_path):
    """--loop-from: a CUDA serving bench of the same model gives each mode's host time per step (step ms - GPU ms),
    added to the step time in a second projection; modes it did not measure get none; bad files are one-line
    errors."""
    src, loop = tmp_path / "converted.json", tmp_path / "loop.json"
    src.write_text(json.dumps({"model": "conv", "prompts": "gsm8k", "points": [
        {"mode": "ar", "concurrency": 2, "tokens_per_forward": 1.0},
        {"mode": "ar-trust", "concurrency": 2, "tokens_per_forward": 2.5}]}))
    loop.write_text(json.dumps({"model": "debug-llama", "points": [
        {"mode": "ar-trust", "concurrency": 2, "step_ms": 3.5, "gpu_step_ms": 3.0},
        {"mode": "ar", "concurrency": 2, "step_ms": 2.5, "gpu_step_ms": None}]}))
    args = ["bench", "--model", "debug-llama", "--step-cost", "--concurrency", "2", "--context", "4", "--block-size",
            "2", "--no-compile", "--tpf-from", str(src), "--out", str(tmp_path)]
    res = CliRunner().invoke(app, [*args, "--loop-from", str(loop)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "step_cost_torch.json").read_text())
    ms = {s["kind"]: s["ms"] for s in data["steps"]}
    (proj,) = data["projected"]
    rows = {r["mode"]: r for r in proj["rows"]}
    assert proj["loop_source"] == str(loop) and "host_ms" not in rows["ar"]
    assert rows["ar-trust"]["host_ms"] == pytest.approx(0.5)
    assert rows["ar-trust"]["tokens_per_second_with_loop"] == pytest.approx(1000 * 2 * 2.5 / (ms["trust"] + 0.5))
    assert "host ms per step" in res.output
    loop.write_text(json.dumps({"model": "qwen3.5-2b", "points": []}))
    with pytest.raises(FlareError, match="measured on 'qwen3.5-2b', not 'debug-llama'"):
        bench.load_loop_overhead(loop, "debug-llama")
    loop.write_text(json.dumps({"model": "debug-llama", "points": [
        {"mode": "ar", "concurrency": 2, "step_ms": 2.5, "gpu_step_ms": None}]}))
    with pytest.raises(FlareError, match="no point with a GPU floor"):
        bench.load_loop_overhead(loop, "debug-llama")
    loop.write_text("{}")
    with pytest.raises(FlareError, match="not a flarectl serving bench JSON"):
        bench.load_loop_overhead(loop, "debug-llama")
    loop.write_text("[1, 2")
    with pytest.raises(FlareError, match="not a flarectl bench JSON"):
        bench.load_loop_overhead(loop, "debug-llama")


@pytest.mark.parametrize("args,message", [
    (["--step-cost", "--tpf-from", "/nonexistent.json"], "--tpf-from /nonexistent.json does not exist"),
    (["--step-cost", "--tpf-from", "/"], "--tpf-from / is a directory"),
    (["--tpf-from", "x.json"], "--tpf-from needs --step-cost"),
    (["--block-size", "0"], "--block-size must be between 1 and 64"),
    (["--step-cost", "--block-size", "100000"], "--block-size must be between 1 and 64"),
    (["--step-cost", "--overlap", "--num-requests", "3"], "--overlap, --num-requests: serving-benchmark options"),
    (["--step-cost", "--prompts", "humaneval"], "--prompts: serving-benchmark options"),
    (["--concurrency", "1,,2"], "comma-separated integers"),
    (["--concurrency", "1,4", "--num-requests", "2"], "--num-requests 2 is below --concurrency 4"),
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    (["--loop-from", "x.json"], "--loop-from needs --step-cost and --tpf-from"),
    (["--mode", "fast"], "--mode must be"),
    (["--concurrency", "0,8"], "--concurrency must be positive"),
    (["--concurrency", "a"], "comma-separated integers"),
    (["--prompts", "/nonexistent.txt"], "--prompts must be"),
    (["--threshold", "2"], "--threshold"),
    (["--diffusion-scheme", "fused"], "--diffusion-scheme must be plain or anchored"),
    (["--gdn-kernel", "cuda"], "--gdn-kernel must be one of auto, triton, mixer, fla, torch"),
    (["--gdn-kernel", "triton,fla"], "a comma list with --step-cost"),
    (["--gemv-tune", "fast"], "--gemv-tune must be chain, cold or off"),
])
def test_bad_options_are_one_line_errors(args, message, one_line_error):
    one_line_error(["bench", "--model", "debug-llama", *args], message)


def test_bad_files_and_outputs_are_one_line_errors_before_any_work(tmp_path, one_line_error, monkeypatch):
    """Prompt files that are directories or not text, an --out that is a file or holds a directory where bench.json
    goes, CUDA-only choices on a CPU-only machine: one line each, before the model loads (nothing is written)."""
    import torch

    from flarectl.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(128, 256)))
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    (tmp_path / "old" / "bench.json").mkdir(parents=True)
    base = ["bench", "--model", "debug-llama", "--no-baseline"]
    cases = [([*base, "--prompts", str(tmp_path)], "is a directory, not a file of prompts"),
             ([*base, "--prompts", str(binary)], "is not UTF-8 text"),
             ([*base, "--out", str(taken)], "exists and is not a directory"),
             ([*base, "--out", str(tmp_path / "old")], "bench.json is a directory")]
    if not torch.cuda.is_available():
        cases += [([*base, "--device", "cuda"], "this torch has no CUDA device"),
                  ([*base, "--gdn-kernel", "triton"], "--gdn-kernel triton needs a CUDA device")]
    for argv, message in cases:
        one_line_error(argv, message)
    assert taken.read_text() == "keep me"


def test_bad_tune_env_is_a_one_line_error(monkeypatch, capsys):
    from flarectl.cli import main

    monkeypatch.setenv("FLARECTL_GEMV_TUNE", "fastest")
    monkeypatch.setattr("sys.argv", ["flarectl", "bench", "--model", "debug-llama", "--step-cost"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "FLARECTL_GEMV_TUNE must be chain, cold or 0" in err and "Traceback" not in err


def test_json_records_the_step_paths(tmp_path, monkeypatch):
    from flarectl.engine import gemv

    monkeypatch.setattr(gemv, "TUNE_MODE", None)  # the CLI sets it from --gemv-tune; restored after the test
    res = CliRunner().invoke(app, ["bench", "--model", "debug-llama", "--step-cost", "--concurrency", "1",
                                   "--context", "4", "--block-size", "2", "--no-compile", "--gemv-tune", "cold",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert gemv.tune_mode() == "cold"  # --gemv-tune reached the tuner
    data = json.loads((tmp_path / "step_cost_torch.json").read_text())
    # CPU: no skinny-GEMM kernels, so nothing tuned and nothing fused into them
    assert data["gemv"] is False and data["gemv_tune"] is None and data["fuse_norm"] is False
    assert data["attn_kernel"] is False and data["fuse_down"] is False and data["gemv_max_rows"] is None
    assert data["gemv_inline_split"] is None and data["gemv_choices"] == {} and data["gemv_tuned"] == {}
    assert "mixer_token_block" not in data  # no GDN layers
    assert data["pdl"] is False and "pdl_preload_kb" not in data  # PDL needs sm_90+
    assert data["l2_next_pairs"] == 0 and "l2_next_row_bytes" not in data  # CUDA only


def test_tuned_projections_report_the_fastest_candidate_and_its_rate(monkeypatch):
    """The JSON's per-shape tuning record: the fastest timed candidate, its ms and the weight read rate (N x K
    weight bytes / ms); the swiglu variant's K is the tuner's own (half the input width); shapes with no timing
    left out."""
    from flarectl.engine import gemv

    a, b = gemv.Config(64, 128, 4, 4, 4), gemv.Config(32, 256, 1, 4, 3)
    monkeypatch.setattr(gemv, "TIMINGS", {
        (8, 2048, 6144, "torch.bfloat16", "cuda:0"): [(a, 0.01), (b, 0.008), (gemv.CUBLAS, 0.02)],
        (8, 8224, 2048, "torch.float32", "cuda:0", "norm+add"): [(b, 0.02)],
        (8, 2048, 12288, "torch.bfloat16", "cuda:0", "swiglu+res"): [(a, 0.01)],
        (8, 4, 4, "torch.bfloat16", "cuda:0"): []})
    got = bench.tuned_projections()
    assert set(got) == {"(8, 2048, 6144, 'torch.bfloat16', 'cuda:0')",
                        "(8, 8224, 2048, 'torch.float32', 'cuda:0', 'norm+add')",
                        "(8, 2048, 12288, 'torch.bfloat16', 'cuda:0', 'swiglu+res')"}
    assert got["(8, 2048, 12288, 'torch.bfloat16', 'cuda:0', 'swiglu+res')"]["weight_gb_per_s"] == round(
        2048 * 6144 * 2 / 1e-5 / 1e9, 1)
    down = got["(8, 2048, 6144, 'torch.bfloat16', 'cuda:0')"]
    assert down["choice"] == str(b) and down["ms"] == 0.008 and down["candidates"] == 3
    assert down["label"] == "32x256 split 1 w4 s3"
    assert gemv.CUBLAS.label == "cuBLAS" and gemv.Config(32, 128, 4, inline=True).label == "32x128 split 4 w4 s4 inline"
    assert down["weight_gb_per_s"] == round(2048 * 6144 * 2 / 8e-6 / 1e9, 1)  # 3145.7 GB/s
    assert got["(8, 8224, 2048, 'torch.float32', 'cuda:0', 'norm+add')"]["weight_gb_per_s"] == round(
        8224 * 2048 * 4 / 2e-5 / 1e9, 1)


def test_tuned_projections_table_renders_rates_against_copy_bandwidth(capsys, monkeypatch):
    """The step-cost CLI's projection table: one row per tuned shape with its kind, choice, ms, GB/s and the share
    of the measured copy bandwidth."""
    from rich.console import Console

    from flarectl.cli import bench as cli_bench

    monkeypatch.setattr(cli_bench, "out", Console(width=200))  # one line per row
    data = {"copy_bandwidth_bytes_per_s": 3.0e12, "gemv_tuned": {
        "(8, 2048, 6144, 'torch.bfloat16', 'cuda:0')": {"choice": "Config(bn=64)", "label": "64x128 split 4 w4 s4",
                                                        "ms": 0.01, "candidates": 3, "weight_gb_per_s": 2516.6},
        "(8, 8224, 2048, 'torch.bfloat16', 'cuda:0', 'norm+add')": {"choice": "Config(bn=32)", "ms": 0.02,
                                                                    "candidates": 2, "weight_gb_per_s": 1684.3}}}
    cli_bench._tuned_projections_table(data)
    text = capsys.readouterr().out
    assert "8 x 2048 x 6144" in text and "plain" in text and "2,517" in text and "84" in text
    assert "64x128 split 4 w4 s4" in text and "Config(bn=32)" in text  # the label, else (older JSON) the choice
    assert "8 x 8224 x 2048" in text and "norm+add" in text and "1,684" in text and "56" in text


def test_step_paths_record_pdl_depth(monkeypatch):
    """With programmatic dependent launch on, the JSON records carry its depth knobs (a stand-in step: PDL itself
    needs sm_90+)."""
    from types import SimpleNamespace

    from flarectl.engine import gemv

    step = SimpleNamespace(gemv=True, fuse_norm=True, fuse_down=False, attn_kernel=False, pdl=True)
    monkeypatch.setattr(gemv, "PDL_PRELOAD_KB", 32)
    monkeypatch.setattr(gemv, "PDL_L2_KB", 64)
    monkeypatch.setattr(gemv, "PDL_TRIGGER_LATE", 1)
    paths = bench.step_paths(SimpleNamespace(eager=step))
    assert paths["pdl"] is True and paths["pdl_preload_kb"] == 32 and paths["pdl_l2_kb"] == 64
    assert paths["pdl_trigger_late"] is True
    assert paths["gemv_inline_split"] is bool(gemv.INLINE_SPLIT) and isinstance(paths["gemv_choices"], dict)
    assert "layer_chain_preload" not in paths  # the stand-in step has no chain
    step.layer_chain = True
    paths = bench.step_paths(SimpleNamespace(eager=step))
    assert paths["layer_chain"] is True and paths["layer_chain_tiling"] in ("fit", "balance")
    assert {"layer_chain_prefetch", "layer_chain_preload", "layer_chain_norm_loop", "layer_chain_tile_kb"} <= set(paths)


def test_json_records_the_mixer_choices(tmp_path):
    from flarectl.engine import mixer

    res = CliRunner().invoke(app, ["bench", "--model", "debug-hybrid", "--step-cost", "--concurrency", "1",
                                   "--context", "4", "--block-size", "2", "--no-compile", "--gdn-kernel", "mixer",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "step_cost_mixer.json").read_text())
    assert data["mixer_token_block"] == mixer.TOKEN_BLOCK and data["mixer_v_block"] == mixer.V_BLOCK
    assert data["mixer_chunk"] is mixer.CHUNK and data["mixer_maxnreg"] == mixer.MAXNREG
    assert data["mixer_anchor_reuse"] is mixer.ANCHOR_REUSE
    assert data["mixer_l2_next_kb"] == mixer.L2_NEXT_KB and data["mixer_l2_at"] in ("start", "end")


def test_prompt_sets_and_file(tmp_path):
    assert len(bench.load_prompt_texts("gsm8k")) == 40
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b"}\n\nplain line\n')
    assert bench.load_prompt_texts(str(path)) == ["a b", "plain line"]
    path.write_text('{"text": 1}\n')
    with pytest.raises(Exception, match="'prompt' field"):
        bench.load_prompt_texts(str(path))


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50 and bench.percentile(values, 99) == 99
    assert bench.percentile([3.0], 99) == 3.0 and bench.percentile([], 50) == 0.0


def test_kernel_env_knobs_are_checked(monkeypatch, tmp_path):
    """The kernels' integer env knobs: unset -> default; a bad value -> one-line FlareError naming the variable, and
    through the CLI exit code 2 without a traceback."""
    import subprocess
    import sys

    from flarectl.engine.envs import env_int
    from flarectl.errors import FlareError

    monkeypatch.delenv("FLARECTL_TEST_KNOB", raising=False)
    assert env_int("FLARECTL_TEST_KNOB", 2) == 2
    monkeypatch.setenv("FLARECTL_TEST_KNOB", "8")
    assert env_int("FLARECTL_TEST_KNOB", 2, power_of_two=True) == 8
    for bad in ("3", "0", "x", "128"):
        monkeypatch.setenv("FLARECTL_TEST_KNOB", bad)
        with pytest.raises(FlareError, match="FLARECTL_TEST_KNOB must be a power of two in"):
            env_int("FLARECTL_TEST_KNOB", 2, high=64, power_of_two=True)
    env = {**__import__("os").environ, "FLARECTL_MIXER_TOKEN_BLOCK": "3"}
    r = subprocess.run([sys.executable, "-m", "flarectl.cli", "bench", "--model", "debug-hybrid", "--step-cost",
                        "--concurrency", "1", "--context", "4", "--no-compile", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "FLARECTL_MIXER_TOKEN_BLOCK must be a power of two" in r.stderr and "Traceback" not in r.stderr
