"""CLI errors (exit 2, one line, no traceback), recipes, training with exact resume, convert -> decode."""

import json
import subprocess
import sys

import pytest

from flarectl.config import load_recipe, shipped_recipes
from flarectl.errors import ConfigError

CLI = [sys.executable, "-m", "flarectl.cli"]


def _run(*args, timeout=600):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "Warning" not in l and "_cpu_device_warning" not in l]


@pytest.mark.parametrize("args, needle", [
    (["decode", "--model", "nobody/nothing-here", "--prompt", "hi"], "offline"),
    (["decode", "--model", "./no/such/dir", "--prompt", "hi"], "does not exist"),
    (["decode", "--mode", "fast", "--prompt", "hi"], "--mode"),
    (["decode", "--threshold", "0", "--prompt", "hi"], "--threshold"),
    (["decode", "--diffusion-scheme", "tree", "--prompt", "hi"], "--diffusion-scheme must be plain or anchored"),
    (["decode", "--block-size", "0", "--prompt", "hi"], "--block-size"),
    (["decode", "--max-new-tokens", "abc", "--prompt", "hi"], "--max-new-tokens"),
    (["decode", "--dtype", "fp8", "--prompt", "hi"], "--dtype"),
    (["train", "no-such-recipe"], "neither a shipped recipe"),
    (["train", "debug", "train.lrr=1"], "did you mean 'lr'"),
    (["train", "debug", "train.lr"], "key.path=value"),
    (["train", "debug", "train.lr=abc"], "expected a number"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    res = _run(*args)
    lines = _error_lines(res.stderr)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(lines) == 1 and needle in lines[0], lines


def test_decode_input_mistakes_are_one_line_in_process(tmp_path, one_line_error):
    """Prompt files that are directories or not text, --prompt together with --prompts-file, a trust mode on a plain
    AR checkpoint without --block-size, an unknown device."""
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(128, 256)))
    text = tmp_path / "prompts.txt"
    text.write_text("hello\n")
    base = ["decode", "--model", "debug-llama", "--max-new-tokens", "2"]
    for args, message in [(["--prompts-file", str(tmp_path)], "is a directory, not a file of prompts"),
                          (["--prompts-file", str(binary)], "is not UTF-8 text"),
                          (["--prompts-file", str(text), "-p", "hi"], "not both"),
                          (["-p", "hi", "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
                          (["-p", " ", "--raw"], "--prompt is empty"),
                          (["-p", "hi", "--mode", "ar-trust"],
                           "--mode ar-trust needs --block-size")]:
        one_line_error([*base, *args], message)


def test_malformed_yaml_and_unsupported_architecture(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    res = _run("train", str(bad))
    assert res.returncode == 2 and "not valid YAML" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    res = _run("decode", "--model", str(tmp_path / "m"), "--prompt", "hi")
    assert res.returncode == 2 and "unsupported architecture 'bert'" in res.stderr


def test_every_shipped_recipe_loads():
    names = shipped_recipes()
    assert {"debug", "quickstart", "smollm2-135m", "qwen3.5-2b"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.flare.block_size >= 1


def test_override_types_are_checked():
    assert load_recipe("debug", ["train.lr=0.5", "flare.block_size=2"]).train.lr == 0.5
    assert load_recipe("debug", ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 would read "1e-4" as a string
    with pytest.raises(ConfigError, match="flare.block_size"):
        load_recipe("debug", ["flare.block_size=true"])
    # YAML 1.1 reads a bare `no` as false: a choice field takes it back as the spelling it lists
    assert load_recipe("debug", ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.fixture(scope="module")
def tiny_recipe():
    return load_recipe("debug", ["data.max_seq_len=192", "train.max_steps=4", "train.save_every=2",
                                 "train.grad_accum=1"])


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, tiny_recipe):
    from flarectl.training.trainer import train

    full = train(tiny_recipe, output_dir=tmp_path / "full")
    part = train(tiny_recipe, output_dir=tmp_path / "resumed", stop_after=2)  # "killed" after 2 steps
    assert [m.step for m in part.history] == [1, 2]
    rest = train(tiny_recipe, output_dir=tmp_path / "resumed", resume=True)
    losses_full = [(m.ar_loss, m.diffusion_loss) for m in full.history]
    losses_resumed = [(m.ar_loss, m.diffusion_loss) for m in part.history + rest.history]
    assert losses_resumed == losses_full
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(l)["diffusion_loss"] > 0 for l in lines)
    assert (tmp_path / "full" / "final" / "recipe.yaml").is_file()


def test_convert_then_decode_loads_the_checkpoint(tmp_path):
    out = tmp_path / "conv"
    res = _run("convert", "debug-hybrid", "--recipe", "debug", "--output-dir", str(out), "--set",
               "data.max_seq_len=192", "--set", "train.max_steps=1", "--set", "train.save_every=0")
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((out / "final" / "config.json").read_text())["flare"]
    assert meta["block_size"] == 4
    for mode in ("ar", "ar-trust", "diffusion-trust"):
        res = _run("decode", "--model", str(out / "final"), "--mode", mode, "--prompt", "hi", "--raw",
                   "--max-new-tokens", "6", "--json", "--dtype", "float32")
        assert res.returncode == 0, res.stderr[-2000:]
        row = json.loads(res.stdout.strip().splitlines()[-1])
        assert len(row["token_ids"]) <= 6 and row["forwards"] >= 1

    # exactness on the trained (converted) checkpoint: AR-Trust greedy == AR greedy, batch 1 and 4, every block size
    from flarectl.decoding import generate
    from flarectl.models.loading import load_model

    model = load_model(str(out / "final"), dtype="float32", device="cpu")
    prompts = [[72, 105], [84, 104, 101, 32, 99, 97, 116], [10], [100, 101, 102, 32, 102, 40, 120, 41, 58]]
    reference = [r.token_ids for r in generate(model, prompts, "ar", max_new_tokens=12, stop_ids=[])]
    for block in (1, 2, 4, 8):
        trust = generate(model, prompts, "ar-trust", block_size=block, max_new_tokens=12, stop_ids=[])
        assert [r.token_ids for r in trust] == reference, block
        alone = generate(model, prompts[1:2], "ar-trust", block_size=block, max_new_tokens=12, stop_ids=[])
        assert alone[0].token_ids == reference[1]
