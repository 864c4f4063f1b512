"""Overlapped trust steps (``flarectl.engine.trust_overlap``): greedy anchored AR-Trust and Diffusion-Trust rows
decided on the device give the same tokens, forwards, acceptance histograms and streams as one step at a time, under
joins and leaves, early stops, forced accepts and rejections, and fallbacks to one step at a time."""

import pytest
import torch

from flarectl.decoding import ar_trust, generate
from flarectl.engine import Engine, Request, modes, trust_overlap
from flarectl.engine.engine import StepInputs

MASK = 258

# prompts of >= 2 tokens: the recompute twin needs a clean token in front of every window
TRUST_MIX = [dict(prompt=[5, 6, 7], mode="ar-trust", max_new_tokens=13),
             dict(prompt=[9, 8], mode="diffusion-trust", max_new_tokens=9, threshold=0.6),
             dict(prompt=list(range(40, 60)), mode="ar-trust", max_new_tokens=17),
             dict(prompt=[1, 2], mode="diffusion-trust", max_new_tokens=5, threshold=0.3),
             dict(prompt=[70, 71, 72], mode="ar-trust", max_new_tokens=6),
             dict(prompt=[3, 4], mode="diffusion-trust", max_new_tokens=11, threshold=1.0),
             dict(prompt=[20, 21, 22, 23], mode="ar-trust", max_new_tokens=1),
             dict(prompt=[30, 31], mode="diffusion-trust", max_new_tokens=14, threshold=0.9)]


def _serve(m, reqs, overlap: bool, backend="auto", concurrency=3, block=4, capacity=64, watch=None):
    """Serve ``reqs`` (Request kwargs; no stop ids unless given): per request (tokens, forwards, finish reason,
    acceptance histogram, streamed tokens), the engine, and how many trust steps were queued ahead. ``watch``: a
    list that takes the longest slot length after every step (static backend)."""
    engine = Engine(m, concurrency=concurrency, capacity=capacity, mask_token_id=MASK, backend=backend,
                    block_size=block, overlap=overlap)
    queued = []
    real = engine._forward_trust_overlapped
    engine._forward_trust_overlapped = lambda: queued.append(1) or real()
    if watch is not None:
        finish = engine.backend.finish_step
        engine.backend.finish_step = lambda rows, **kw: finish(rows, **kw) or watch.append(
            int(engine.backend.cache.lengths.max()))
    streamed = {}
    for kw in reqs:
        engine.submit(Request(**{"stop_ids": [], **kw},
                              on_token=lambda i, new: streamed.setdefault(i, []).extend(new)))
    out = [(r.token_ids, r.forwards, r.finish_reason, r.acceptance_histogram, streamed.get(r.index, []))
           for r in engine.run()]
    return out, engine, len(queued)


def _idle(engine):
    return engine._inflight is None and not (engine._trust and engine._trust.loaded) and not engine.rows


@pytest.mark.parametrize("name", ["debug-hybrid", "debug-llama"])
def test_overlapped_trust_steps_give_the_same_tokens(sharp, name):
    """Mixed AR-Trust and Diffusion-Trust requests (thresholds 0.3 to 1.0) joining and leaving three slots: the
    overlapped loop == one step at a time on every backend, and AR-Trust == AR greedy."""
    m = sharp[name]
    for backend in ("static", "adapter", "recompute"):
        on, engine, queued = _serve(m, TRUST_MIX, True, backend)
        off, _, none = _serve(m, TRUST_MIX, False, backend)
        assert on == off, backend
        assert queued > 0 and none == 0 and _idle(engine)
    assert all(len(t) == kw["max_new_tokens"] and t == st for (t, _, _, _, st), kw in zip(on, TRUST_MIX))
    ar = generate(m, [TRUST_MIX[2]["prompt"]], "ar", max_new_tokens=17, stop_ids=[])[0].token_ids
    assert on[2][0] == ar
    assert sum(h[1:].count(0) < len(h) - 1 for _, _, _, h, _ in on[1::2]) >= 2  # the denoising passes decide tokens


def _forced(reference, correct: bool):
    """An ``ar_trust.propose`` hook: drafts equal to the AR tokens (accepted) or never equal (rejected)."""
    def propose(q, sampler, rows, generated):
        block, out = q.shape[1], []
        for r, g in zip(rows, generated):
            truth = (reference.get(r, []) + [0] * (block + 1))[g:g + block]
            out.append(truth if correct else [(t + 1) % 256 for t in truth])
        return torch.tensor(out)
    return propose


@pytest.mark.parametrize("correct", [True, False])
def test_overlapped_forced_accepts_and_rejections(sharp, monkeypatch, correct):
    """Forced drafts through ``ar_trust.propose``'s hook, called by the device loop as by the host loop: full accepts
    (their clean tokens committed after the step, the bonus next) and rejections (the accepted prefix committed by
    the next draft step) give AR greedy's tokens, the same forwards and histograms either way."""
    m = sharp["debug-hybrid"]
    reqs = [dict(prompt=[5, 6, 7], mode="ar-trust", max_new_tokens=15), dict(prompt=[9, 1], mode="ar-trust",
            max_new_tokens=9), dict(prompt=list(range(40, 50)), mode="ar-trust", max_new_tokens=12),
            dict(prompt=[3, 3], mode="ar-trust", max_new_tokens=7)]
    reference = {i: generate(m, [kw["prompt"]], "ar", max_new_tokens=kw["max_new_tokens"], stop_ids=[])[0].token_ids
                 for i, kw in enumerate(reqs)}
    monkeypatch.setattr(ar_trust, "propose", _forced(reference, correct))
    on, engine, queued = _serve(m, reqs, True)
    assert on == _serve(m, reqs, False)[0] and queued > 0 and _idle(engine)
    assert [t for t, *_ in on] == [reference[i] for i in range(len(reqs))]
    hists = [h for _, _, _, h, _ in on]
    if correct:
        assert all(h[3] >= 1 for h in hists) and on[0][1] == 5  # 15 tokens: 1 + 3 x 4 + the last verify's 2
    else:
        assert all(not any(h[1:]) for h in hists) and all(f == len(t) for t, f, *_ in on)


def test_overlap_stops_early_and_falls_back(sharp, monkeypatch):
    """Stop ids end rows while a step for them is queued (dropped); AR, sampled, block-1 and failing requests in the
    same engine turn the loop to one step at a time and back (the rows' state returns from the device and goes
    back): the same results. The anchored commit step's forced first pass (env) is honoured."""
    m = sharp["debug-hybrid"]
    base = dict(prompt=[5, 6, 7], mode="ar-trust", max_new_tokens=12)
    stops = _serve(m, [base], False)[0][0][0][3:5]
    dt_stops = _serve(m, [TRUST_MIX[7]], False)[0][0][0][4:6]
    reqs = [dict(base, stop_ids=stops), *TRUST_MIX[1:4], dict(TRUST_MIX[7], stop_ids=dt_stops),
            dict(prompt=[60, 61], mode="ar", max_new_tokens=4),
            dict(prompt=[70, 71], mode="ar-trust", max_new_tokens=6, temperature=0.8, seed=3),
            dict(prompt=[7, 7], mode="diffusion-trust", max_new_tokens=5, block_size=1),
            dict(prompt=[], mode="ar-trust", max_new_tokens=3), *TRUST_MIX[4:7]]
    for force in ("0", "1"):
        monkeypatch.setenv("FLARECTL_DT_ANCHORED_FORCE_FIRST", force)
        on, engine, queued = _serve(m, reqs, True)
        assert on == _serve(m, reqs, False)[0] and queued > 0 and _idle(engine), force
    assert on[0][2] == "eos" and on[0][0][-1] in stops and on[4][2] == "eos" and on[8][2] == "error"


def test_overlap_at_the_slot_capacity(sharp):
    """Rows whose prompt + max_new_tokens + 2 blocks + 2 fill the slot exactly (the step queued past a row's end
    included): the same tokens, and no slot's length passes the capacity. Block sizes 2 and 5."""
    m = sharp["debug-hybrid"]
    for block in (2, 5):
        reqs = [dict(prompt=[5, 6, 7], mode="ar-trust", max_new_tokens=40 - 3 - 2 * block - 2),
                dict(prompt=list(range(10, 20)), mode="diffusion-trust", max_new_tokens=40 - 10 - 2 * block - 2,
                     threshold=0.5),
                dict(prompt=[1, 2], mode="ar-trust", max_new_tokens=40 - 2 - 2 * block - 2)]
        lengths = []
        on, engine, queued = _serve(m, reqs, True, "static", block=block, capacity=40, watch=lengths)
        assert on == _serve(m, reqs, False, "static", block=block, capacity=40)[0] and queued > 0
        assert all(r == "length" for _, _, r, _, _ in on) and 20 < max(lengths) <= 40


def _rows_in_every_phase(m, block=4):
    """An engine whose three slots hold an AR-Trust row in draft (after a rejection), one in verify and an anchored
    Diffusion-Trust row mid-block, all on the host between steps."""
    engine = Engine(m, concurrency=4, capacity=64, mask_token_id=MASK, block_size=block, overlap=False)
    for kw in (TRUST_MIX[0], TRUST_MIX[2], TRUST_MIX[7]):
        engine.submit(Request(**kw, stop_ids=[]))
    engine.step()
    engine.step()
    rows = engine.rows
    rows[0].phase, rows[0].commit_tokens, rows[0].pending = "draft", [11, 12], 13
    rows[1].phase, rows[1].drafts, rows[1].pending = "verify", [21, 22, 23], 20
    rows[2].x, rows[2].decided, rows[2].emitted, rows[2].pending = [31, 32, 33], [True, False, True], 1, 30
    return engine


def test_state_inputs_equal_the_host_plans(sharp):
    """``TrustState.inputs`` == ``modes.plan`` through ``StepInputs.upload`` at width (B, B), for rows in every
    phase (draft after a rejection, verify, denoise, commit) and an empty slot; ``store`` gives back what ``load``
    took."""
    engine = _rows_in_every_phase(sharp["debug-hybrid"])
    rows = list(engine.rows.items())
    before = [(r.pending, r.phase, list(r.drafts), list(r.commit_tokens), list(r.x), list(r.decided), r.emitted)
              for _, r in rows]
    for decided in ([True, False, True], [True, True, True]):  # denoise, then commit
        rows[2][1].decided = decided
        state = trust_overlap.TrustState(4, 4, MASK, torch.device("cpu"))
        state.load(rows)
        got = state.inputs()
        plans = {slot: modes.plan(row) for slot, row in rows}
        want = StepInputs(4, "cpu").upload(plans, 4, 4)
        for g, w, name in zip(got, want, ("ids", "counts", "wlen", "commit", "seen")):
            assert torch.equal(g, w), (name, g, w)
        state.store(rows)
        rows[0][1].commit_tokens = [11, 12]  # ``plan`` consumed them; ``store`` gave them back from the device
    after = [(r.pending, r.phase, list(r.drafts), list(r.commit_tokens), list(r.x), list(r.decided), r.emitted)
             for _, r in rows]
    assert after[:2] == before[:2]
    assert [after[2][i] for i in (0, 4, 6)] == [before[2][i] for i in (0, 4, 6)]  # (a DT row's phase is planned)


def test_only_greedy_anchored_rows_with_one_block_overlap(sharp):
    m = sharp["debug-hybrid"]
    engine = Engine(m, concurrency=2, capacity=64, mask_token_id=MASK, block_size=4, overlap=True)
    engine.submit(Request([5, 6], "ar-trust", max_new_tokens=8, stop_ids=[]))
    engine.submit(Request([7, 8], "diffusion-trust", max_new_tokens=8, stop_ids=[]))
    engine._admit()
    assert engine._overlap_kind() == "trust"
    engine.rows[1].block = 3
    assert engine._overlap_kind() is None
    engine.rows[1].block, engine.rows[1].scheme = 4, modes.PLAIN
    assert engine._overlap_kind() is None
    assert trust_overlap.block_of(engine.rows[0]) == 4
    with pytest.raises(ValueError, match="block size"):
        trust_overlap.TrustState(2, 1, MASK, torch.device("cpu"))


def _host_step(engine, logits):
    """One step's update the host way (``modes.plan`` then ``modes.update`` per group at width (B, B)): per slot the
    rows' late-commit flags."""
    for row in engine.rows.values():
        modes.plan(row)
    groups = {}
    for row in engine.rows.values():
        groups.setdefault(modes.group_key(row), []).append(row)
    for rows in groups.values():
        modes.update(rows, logits, engine.block_size, rows[0].sampler, torch.tensor([r.slot for r in rows]))
    return {slot: row.commit_late for slot, row in engine.rows.items()}


def _fields(row):
    return (list(row.tokens), list(row.hist), row.pending, row.finish, row.phase if row.mode == "ar-trust" else "",
            list(row.drafts) if row.phase == "verify" else [], list(row.commit_tokens), list(row.x),
            list(row.decided), row.emitted)


@pytest.mark.parametrize("accepted", [0, 1, 2, 3])
@pytest.mark.parametrize("dt_phase", ["denoise", "commit"])
def test_advance_equals_the_host_update(sharp, accepted, dt_phase):
    """``TrustState.advance`` (+ ``apply_record``) against the host's ``modes.update`` on the same logits: every
    row's emitted tokens, histogram, next state and late commit, for a verify row that accepts 0..3 drafts (3: a
    full accept), a draft row, and a Diffusion-Trust row denoising or committing whose confidences tie exactly at
    its threshold (0.5: two equal top logits; ``>=`` decides them)."""
    m = sharp["debug-hybrid"]
    g = torch.Generator().manual_seed(10 * accepted + len(dt_phase))
    logits = torch.randn(4, 8, 260, generator=g, dtype=torch.float64) * 3
    host, device = _rows_in_every_phase(m), _rows_in_every_phase(m)
    for engine in (host, device):
        rows = engine.rows
        rows[1].drafts = [int(logits[1, j].argmax()) if j < accepted else 257 for j in range(3)]
        rows[2].req.threshold = 0.5
        if dt_phase == "commit":
            rows[2].decided = [True] * 3
    for pos in range(4, 8):  # the DT row's window: position 4 + j's top two logits equal (confidence <= 0.5)
        logits[2, pos, 100 + pos] = logits[2, pos, 200 + pos] = 1e3
    verifies = list(host.rows[1].hist)
    late = _host_step(host, logits)
    state = trust_overlap.TrustState(4, 4, MASK, torch.device("cpu"))
    state.load(list(device.rows.items()))
    state.inputs()
    got_late, record, _ = state.advance(logits, force_first=False)
    for slot, row in device.rows.items():
        row.forwards += 1
        trust_overlap.apply_record(row, record[slot].tolist(), 4)
    state.store(list(device.rows.items()))
    for slot in host.rows:
        assert _fields(device.rows[slot]) == _fields(host.rows[slot]), slot
        assert bool(got_late[slot]) == late[slot]
    assert host.rows[1].hist[accepted] == verifies[accepted] + 1 and late[1] == (accepted == 3)
    assert all(host.rows[2].decided)  # every tie decided (>= threshold), not only the forced most confident one


def test_compiled_advance_equals_eager(sharp):
    """The compiled path (``_advance_fused`` through torch.compile: the read-out op, ``decide``, the in-place state
    update and the next inputs in one function; the CUDA default, graphed there) == the eager path, step after step
    on the same logits stream."""
    engine = _rows_in_every_phase(sharp["debug-hybrid"])
    rows = list(engine.rows.items())
    states = [trust_overlap.TrustState(4, 4, MASK, torch.device("cpu"), compile=c, graphs=False) for c in (False, True)]
    for state in states:
        state.load(rows)
        state.threshold.fill_(0.4)
    assert states[1]._fast is not None and states[0]._fast is None
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        logits = torch.randn(4, 8, 260, generator=g, dtype=torch.float64) * 4
        outs = [state.advance(logits, force_first=step == 1) for state in states]
        for a, b in zip(outs[0][:2] + outs[0][2], outs[1][:2] + outs[1][2]):
            assert torch.equal(a, b)
        for name, t in states[0].tensors().items():
            assert torch.equal(t, getattr(states[1], name)), name


@pytest.mark.gpu
def test_overlapped_trust_steps_on_cuda_give_the_same_tokens(monkeypatch):
    """On CUDA the overlapped trust loop runs its decisions compiled and replayed from a CUDA graph on the graphed
    step's logits; its tokens, forwards and histograms == one step at a time with the same one-pass read-out."""
    from flarectl.models.loading import load_model

    monkeypatch.setattr(modes, "GREEDY_READ", True)
    m = load_model("debug-hybrid", dtype="float32", device="cuda", seed=1)
    with torch.no_grad():
        m.hf.lm_head.weight.mul_(30)
    on, engine, queued = _serve(m, TRUST_MIX, True)
    assert on == _serve(m, TRUST_MIX, False)[0] and queued > 0 and _idle(engine)
    assert engine.backend.cuda_graphs and engine._trust.graphs and engine._trust.compiled and engine._trust._graphs


def test_64_overlapped_trust_requests_complete_once(debug_models):
    """64 greedy trust requests of mixed modes and lengths through 8 slots, overlapped: each finishes exactly once
    (reported by the step that read its end), streams what it returns, and equals the step-at-a-time run."""
    m = debug_models["debug-llama"]
    runs = []
    for overlap in (True, False):
        engine = Engine(m, concurrency=8, capacity=48, mask_token_id=MASK, block_size=3, overlap=overlap)
        streamed: dict[int, list[int]] = {}
        finished = []
        for i in range(64):
            prompt = [(7 * i + j) % 250 for j in range(1 + i % 13)]
            engine.submit(Request(prompt, ("ar-trust", "diffusion-trust")[i % 2], max_new_tokens=1 + i % 9,
                                  threshold=0.3 + 0.1 * (i % 7), stop_ids=[],
                                  on_token=lambda k, new: streamed.setdefault(k, []).extend(new)))
        while engine.busy:
            finished += [r.index for r in engine.step()]
            assert len(engine.rows) <= 8
        assert sorted(finished) == list(range(64)) and _idle(engine)
        results = [engine.done[i] for i in range(64)]
        assert all(len(r.token_ids) == 1 + r.index % 9 and streamed[r.index] == r.token_ids for r in results)
        runs.append(([(r.token_ids, r.forwards, r.acceptance_histogram) for r in results], engine.overlapped_steps))
    assert runs[0][0] == runs[1][0] and runs[0][1] > 0 and runs[1][1] == 0


def test_overlapped_commits_ask_for_the_row_copy_kernel(sharp):
    """The overlapped loop commits after every step with the mask on the device, so it asks ``finish_step`` for the
    masked row copy (``row_copy``: only masked rows move); one step at a time leaves the choice to ``KERNEL``."""
    m = sharp["debug-hybrid"]
    asked = {True: [], False: []}
    for overlap in (True, False):
        engine = Engine(m, concurrency=2, capacity=64, mask_token_id=MASK, block_size=4, overlap=overlap)
        finish = engine.backend.finish_step
        engine.backend.finish_step = lambda rows, copy_kernel=None, _o=overlap: (
            asked[_o].append(copy_kernel) or finish(rows, copy_kernel))
        for kw in TRUST_MIX[:3]:
            engine.submit(Request(**kw, stop_ids=[]))
        engine.run()
    assert asked[True] and set(asked[True]) == {True} and set(asked[False]) == {None}


def test_a_threshold_just_below_one_decides_certain_tokens_in_fp32():
    """fp32 confidences of exactly 1.0 and a threshold of 1 - 1e-8 (1.0 once rounded to fp32): the host decides
    those tokens (``select_confident`` tests ``< 1`` on the float), and so does ``decide`` (on the fp64
    threshold)."""
    from flarectl.decoding import diffusion_trust

    s = trust_overlap.TrustState(2, 4, MASK, torch.device("cpu"))
    s.live[:] = True
    s.dt[:] = True
    s.threshold.fill_(1 - 1e-8)
    logits = torch.full((2, 8, 50), -1e4)
    logits[:, :, 7] = 0.0  # softmax exactly 1.0 at every position
    tok, conf = diffusion_trust.propose(logits[:, 4:7], trust_overlap.modes.Sampler.create(0.0, 1.0, 0, "cpu"))
    host = diffusion_trust.select_confident(conf, torch.ones(2, 3, dtype=torch.bool), 1 - 1e-8, force=True)
    assert conf.dtype == torch.float32 and bool(host.all())
    new, *_ = trust_overlap.decide(s.tensors(), *trust_overlap.device_read(logits), 4, MASK, False)
    assert bool(new["decided"].all())


def test_a_failed_compile_warns_and_runs_eager(sharp, monkeypatch):
    """If torch.compile of the decisions fails, the step runs eager (a warning), and the decisions are the same."""
    engine = _rows_in_every_phase(sharp["debug-hybrid"])
    rows = list(engine.rows.items())

    def broken(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("inductor says no")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    states = [trust_overlap.TrustState(4, 4, MASK, torch.device("cpu"), compile=c, graphs=False) for c in (True, False)]
    logits = torch.randn(4, 8, 260, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = []
    for state in states:
        state.load(rows)
        with pytest.warns(UserWarning, match="inductor says no") if state.compiled else _no_warning():
            outs.append(state.advance(logits, force_first=False))
    assert not states[0].compiled and states[0]._fast is None
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])


def _no_warning():
    import contextlib

    return contextlib.nullcontext()
