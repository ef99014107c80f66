"""Prompt bank: file format, validation, the openai backend against a real local HTTP server,
the hf backend with a tiny random chat model, resumption and the ``prompts`` command."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

import pytest

from dalda_aug.errors import DaldaError, InputError, MissingFileError
from dalda_aug.prompts import (
    DEFAULT_PREFIX,
    BackendError,
    HFChatBackend,
    IncompletePromptBankError,
    OpenAIChatBackend,
    PromptBank,
    TemplateBackend,
    generate_prompt_bank,
    load_clip_tokenizer,
    parse_answer,
    parse_backend,
    validate_prompt,
)
from helpers import noise
from llm_server import ChatServer, per_class, reply, reply_json, stall, status

PETS = ["cat", "wildcat", "bulldog", "american bulldog"]

VIEWS = ["from above", "in profile", "up close", "from far away", "at eye level", "from behind"]


def good(name: str, call: int) -> str:
    """A valid, distinct sentence for ``name`` on the ``call``-th request."""
    return f"A photo of a {name} seen {VIEWS[call % len(VIEWS)]} on a sunny meadow."


@pytest.fixture(autouse=True)
def _local_http(monkeypatch):
    # The test server is on 127.0.0.1: never send it through a proxy of the environment.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    from dalda_aug.tiny_models import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def clip_tok(clip_tokenizer_dir):
    return load_clip_tokenizer(clip_tokenizer_dir)


def backend_for(server: ChatServer, **kw) -> OpenAIChatBackend:
    kw.setdefault("base_delay", 0.001)
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout", 5.0)
    return OpenAIChatBackend("test-model", base_url=server.base_url, **kw)


# -- PromptBank ----------------------------------------------------------------------------------
def test_bank_save_load_keeps_utf8_and_provenance(tmp_path):
    bank = PromptBank(
        {"crème brûlée": ["une crème brûlée dorée sur une table en marbre"], "鯉": ["池で泳ぐ赤い鯉の写真"]},
        {"backend": "openai", "model": "m", "description": "Desserts & 魚", "temperature": 1.0},
    )
    path = bank.save(tmp_path / "sub" / "bank.json")
    raw = path.read_bytes()
    assert "crème brûlée".encode("utf-8") in raw and "池で泳ぐ".encode("utf-8") in raw
    assert b"\\u" not in raw  # not escaped
    data = json.loads(raw.decode("utf-8"))
    assert data["format"] == "dalda_aug.prompts/1"
    assert set(data) == {"format", "provenance", "prompts"}
    loaded = PromptBank.load(path)
    assert loaded == bank
    assert loaded.class_names == ["crème brûlée", "鯉"]
    assert not list(tmp_path.glob("sub/.*tmp*"))  # no temporary file left behind


def test_bank_lookup_render_and_cycling():
    bank = PromptBank({"american bulldog": ["a {name} on a beach", "a sleepy {name} on a sofa"], "cat": ["a cat"]})
    assert bank["american bulldog"] == ["a {name} on a beach", "a sleepy {name} on a sofa"]
    # folder-style and differently cased names find the class; the stored name is used in the text
    assert "american_bulldog" in bank and "American Bulldog" in bank and "bulldog" not in bank
    assert bank.render("american_bulldog", 0) == "a american bulldog on a beach"
    assert bank.render("american bulldog", 3) == "a sleepy american bulldog on a sofa"
    assert bank.render("cat", 7) == "a cat"
    assert bank.class_names == ["american bulldog", "cat"] and len(bank) == 2
    with pytest.raises(KeyError, match="dog"):
        bank["dog"]
    bank["cat"].append("mutated copy")
    assert bank["cat"] == ["a cat"]
    assert bank.short_classes(2) == {"cat": 1}
    with pytest.raises(InputError, match="no prompt for class 'cat'"):
        PromptBank({"cat": []}).render("cat", 0)


def test_from_template():
    bank = PromptBank.from_template(["cat", "sea lion"])
    assert bank.prompts == {"cat": ["a photo of a cat"], "sea lion": ["a photo of a sea lion"]}
    assert bank.provenance["backend"] == "template" and bank.provenance["template"] == "a photo of a {}"
    assert "date" in bank.provenance
    assert PromptBank.from_template(["cat"], "a painting of a {name}")["cat"] == ["a painting of a cat"]
    with pytest.raises(InputError, match="must contain"):
        PromptBank.from_template(["cat"], "a photo")
    with pytest.raises(InputError, match="twice"):
        PromptBank.from_template(["cat", "cat"])


def test_bank_constructor_and_load_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nothere.json"):
        PromptBank.load(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="bad.json.*not valid JSON"):
        PromptBank.load(bad)
    bad.write_text('{"format": "other/9", "prompts": {}}', encoding="utf-8")
    with pytest.raises(InputError, match="bad.json.*format 'other/9'"):
        PromptBank.load(bad)
    bad.write_text('{"format": "dalda_aug.prompts/1", "prompts": {"cat": "a cat"}}', encoding="utf-8")
    with pytest.raises(InputError, match="bad.json.*list of strings"):
        PromptBank.load(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match="bad.json.*JSON object"):
        PromptBank.load(bad)
    plain = tmp_path / "plain.json"
    plain.write_text('{"cat": ["a cat on a roof"]}', encoding="utf-8")
    assert PromptBank.load(plain)["cat"] == ["a cat on a roof"]
    with pytest.raises(InputError):
        PromptBank({"cat": [""]})


def test_failed_save_leaves_previous_file_intact(tmp_path):
    path = PromptBank({"cat": ["a cat on a roof"]}).save(tmp_path / "bank.json")
    before = path.read_bytes()
    with pytest.raises(InputError, match="provenance"):
        PromptBank({"cat": ["a dog"]}, {"when": object()}).save(path)
    assert path.read_bytes() == before


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, class_name, reason",
    [
        ("A fluffy cat sleeping on a red sofa.", "cat", None),
        ("Two cats chasing a ball in a sunny garden.", "cat", None),
        ("A {name} sleeping on a red sofa.", "cat", None),
        ("A dog sleeping on a red sofa.", "cat", "does not name its class 'cat'"),
        ("A wildcat prowling through tall grass.", "cat", "another class: 'wildcat'"),
        ("A cat watching a wildcat in the zoo.", "cat", "another class: 'wildcat'"),
        ("A wildcat prowling through tall grass at dusk.", "wildcat", None),
        ("An American Bulldog running on a beach.", "american bulldog", None),
        ("An american_bulldog running on a beach.", "american bulldog", None),
        ("An American Bulldog running on a beach.", "bulldog", "another class: 'american bulldog'"),
        ("A bulldog resting next to an american bulldog.", "american bulldog", "another class: 'bulldog'"),
        ("A bulldog chewing a bone on the lawn.", "bulldog", None),
        ("A cat. A dog barking loudly.", "cat", "more than one sentence"),
        ("A cat on a mat.\nIt sleeps.", "cat", "several lines"),
        ("A cat, e.g. a tabby, on Mr. Smith's porch.", "cat", None),
        ("A cat.", "cat", "nothing beyond the class name"),
        ("", "cat", "empty"),
    ],
)
def test_validate_prompt_rules(prompt, class_name, reason):
    got = validate_prompt(prompt, class_name, PETS)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_validate_whole_words_only():
    # "wildcat" does not contain the word "cat", even when "wildcat" is no class of the dataset
    assert "does not name its class 'cat'" in validate_prompt("A wildcat in tall grass.", "cat", ["cat", "dog"])
    assert validate_prompt("A cat watching a bobcat in tall grass.", "cat", ["cat", "dog"]) is None


def test_validate_plurals_and_non_ascii():
    names = ["butterfly", "Leopards", "crème brûlée", "鯉"]
    assert validate_prompt("Three butterflies resting on a purple flower.", "butterfly", names) is None
    assert validate_prompt("A leopard resting on a tree branch at dawn.", "Leopards", names) is None
    assert validate_prompt("Une CRÈME BRÛLÉE dorée sur une table en marbre.", "crème brûlée", names) is None
    assert validate_prompt("池で泳ぐ赤い 鯉 の写真。", "鯉", names) is None
    assert "more than one sentence" in validate_prompt("池で泳ぐ 鯉。夕方の写真", "鯉", names)
    # scripts without spaces: names are found inside words, the longest overlapping name wins
    cats = ["猫", "山猫"]
    assert validate_prompt("ソファの上で眠る白い猫の写真", "猫", cats) is None
    assert validate_prompt("雪の森を歩く山猫の写真", "山猫", cats) is None
    assert "another class: '山猫'" in validate_prompt("山猫を見つめる猫の写真", "猫", cats)


def test_validate_token_window_matches_the_clip_tokenizer(clip_tok):
    def prompt(k: int) -> str:
        return "A cat with " + " ".join(["red"] * k) + " stripes."

    def n_tokens(text: str) -> int:  # what Stable Diffusion's tokenizer would see, untruncated
        return len(clip_tok(DEFAULT_PREFIX + text, truncation=False)["input_ids"])

    k = next(k for k in range(1, 100) if n_tokens(prompt(k)) == 77)
    assert validate_prompt(prompt(k), "cat", ["cat"], clip_tok) is None
    why = validate_prompt(prompt(k + 1), "cat", ["cat"], clip_tok)
    assert why is not None and "78 CLIP tokens" in why
    # the prefix counts: without it the same prompt fits
    assert validate_prompt(prompt(k + 1), "cat", ["cat"], clip_tok, prefix="") is None
    # the placeholder is measured with the class name filled in
    long_name = "very long winded hypothetical class name"
    text = "A {name} with " + " ".join(["red"] * (k - 4)) + " stripes."
    assert n_tokens(text.replace("{name}", long_name)) > 77
    assert "too long" in validate_prompt(text, long_name, [long_name], clip_tok)


def test_validate_duplicates():
    existing = ["A fluffy cat sleeping on a red sofa."]
    assert "repeats" in validate_prompt("a fluffy Cat sleeping on a red sofa", "cat", ["cat"], existing=existing)
    assert "repeats" in validate_prompt("A fluffy {name} sleeping on a red sofa!", "cat", ["cat"], existing=existing)
    assert validate_prompt("A fluffy cat sleeping on a blue sofa.", "cat", ["cat"], existing=existing) is None


def test_parse_answer_forms():
    obj = {"cat": "A cat on a roof.", "鯉": "池の鯉。"}
    text = json.dumps(obj, ensure_ascii=False)
    assert parse_answer(text) == obj
    assert parse_answer(f"Sure! Here you go:\n```json\n{text}\n```\nEnjoy.") == obj
    assert parse_answer(f"<think>{{'draft': 1}}</think>Here: {text} -- done") == obj
    with pytest.raises(ValueError, match="no JSON object"):
        parse_answer("I cannot help with that.")
    with pytest.raises(ValueError):
        parse_answer('["a list", "not an object"]')


# -- openai backend against a real HTTP server ------------------------------------------------------
def test_valid_json_rounds_and_protocol(tmp_path, clip_tok, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "bank.json"
    with ChatServer([], default=per_class(good), api_key="sk-test") as server:
        bank = generate_prompt_bank(
            PETS, backend_for(server), m=3, description="Pet photos from Oxford.", tokenizer=clip_tok, out=out
        )
    assert len(server.requests) == 3  # one request per round, all classes in it
    for request in server.requests:
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer sk-test"
        assert request.body["model"] == "test-model" and request.body["temperature"] == 1.0
        assert [m["role"] for m in request.body["messages"]] == ["system", "user"]
        assert "Pet photos from Oxford." in request.user_message
        assert json.dumps(PETS) in request.user_message  # the full class list
        assert request.requested == PETS
    assert bank.class_names == PETS
    for name in PETS:
        assert bank[name] == [good(name, call) for call in (1, 2, 3)]
    prov = bank.provenance
    assert prov["backend"] == "openai" and prov["model"] == "test-model" and prov["base_url"] == server.base_url
    assert prov["temperature"] == 1.0 and prov["description"] == "Pet photos from Oxford."
    assert prov["m"] == 3 and prov["complete"] is True and prov["rounds"] == 3 and "date" in prov
    assert PromptBank.load(out) == bank


def test_markdown_fenced_answers(clip_tok):
    fenced = per_class(good, wrap=lambda s: f"Here are the sentences:\n```json\n{s}\n```")
    with ChatServer([], default=fenced) as server:
        bank = generate_prompt_bank(["cat", "dog"], backend_for(server), m=2, tokenizer=clip_tok)
    assert bank["cat"] == [good("cat", 1), good("cat", 2)] and len(server.requests) == 2


def test_missing_and_extra_classes_matched_by_key(clip_tok):
    first = reply_json({
        "Hamster": "A hamster in a wheel.",  # not a class of the dataset
        "American_Bulldog": good("american bulldog", 0),  # key spelled differently
        "cat": good("cat", 0),
        # "bulldog" and "wildcat" are missing
    })
    with ChatServer([first], default=per_class(good)) as server:
        bank = generate_prompt_bank(PETS, backend_for(server), m=1, tokenizer=clip_tok)
    assert server.requests[1].requested == ["wildcat", "bulldog"]  # only the missing ones are asked again
    assert bank.prompts == {
        "cat": [good("cat", 0)],
        "wildcat": [good("wildcat", 1)],
        "bulldog": [good("bulldog", 1)],
        "american bulldog": [good("american bulldog", 0)],
    }
    assert "hamster" not in bank


def test_answers_are_matched_by_key_not_position(clip_tok):
    names = ["cat", "dog", "parrot"]
    shuffled = {"parrot": good("parrot", 0), "cat": good("cat", 0), "dog": good("dog", 0)}
    with ChatServer([reply_json(shuffled)]) as server:
        bank = generate_prompt_bank(names, backend_for(server), m=1, tokenizer=clip_tok)
    assert {n: bank[n] for n in names} == {n: [good(n, 0)] for n in names}


def test_prompts_naming_another_class_are_reasked(clip_tok):
    first = reply_json({
        "cat": "A cat hissing at a wildcat behind a fence.",
        "wildcat": "A wildcat stalking prey in the snowy forest.",
        "bulldog": "A bulldog sitting beside an American bulldog on the porch.",
        "american bulldog": "An American bulldog playing with a ball in the park.",
    })
    with ChatServer([first], default=per_class(good)) as server:
        bank = generate_prompt_bank(PETS, backend_for(server), m=1, tokenizer=clip_tok)
    second = server.requests[1]
    assert second.requested == ["cat", "bulldog"]
    assert "names another class: 'wildcat'" in second.user_message  # the model is told why
    assert bank["cat"] == [good("cat", 1)] and bank["bulldog"] == [good("bulldog", 1)]
    assert bank["american bulldog"] == ["An American bulldog playing with a ball in the park."]


def test_overlong_prompts_are_reasked(clip_tok):
    long = "A cat " + " ".join(["sitting very calmly"] * 25) + " on a red sofa."
    with ChatServer([reply_json({"cat": long})], default=per_class(good)) as server:
        bank = generate_prompt_bank(["cat"], backend_for(server), m=1, tokenizer=clip_tok)
    assert bank["cat"] == [good("cat", 1)]
    assert "too long" in server.requests[1].user_message


def test_non_ascii_text_survives_the_round_trip(tmp_path, clip_tok):
    names = ["crème brûlée", "鯉", "Straßenbahn"]
    answers = {
        "crème brûlée": "Une crème brûlée dorée, caramélisée, sur une table en marbre.",
        "鯉": "夕暮れの池で泳ぐ赤と白の鯉の写真",
        "Straßenbahn": "Eine gelbe Straßenbahn fährt über eine Brücke in München.",
    }
    out = tmp_path / "bank.json"
    with ChatServer([reply_json(answers)]) as server:
        bank = generate_prompt_bank(names, backend_for(server), m=1, description="Desserts, 魚, Züge",
                                    tokenizer=clip_tok, out=out)
    assert "Desserts, 魚, Züge" in server.requests[0].user_message and "crème brûlée" in server.requests[0].user_message
    assert {n: bank[n][0] for n in names} == answers
    raw = out.read_text(encoding="utf-8")
    assert "夕暮れの池" in raw and "Straßenbahn" in raw and "\\u" not in raw
    assert PromptBank.load(out) == bank


def test_429_then_success_honours_retry_after(clip_tok):
    with ChatServer([status(429, "slow down", retry_after=0.3)], default=per_class(good)) as server:
        t0 = time.perf_counter()
        bank = generate_prompt_bank(["cat"], backend_for(server, max_delay=5.0), m=1, tokenizer=clip_tok)
        elapsed = time.perf_counter() - t0
    assert len(server.requests) == 2 and bank["cat"] == [good("cat", 1)]
    assert 0.3 <= elapsed < 5


def test_5xx_and_timeout_are_retried_with_backoff():
    messages = [{"role": "user", "content": "hi"}]
    with ChatServer([status(503), status(502), stall(1.5, reply("late")), reply("ok")]) as server:
        backend = backend_for(server, max_retries=3, base_delay=0.05, timeout=0.5)
        t0 = time.perf_counter()
        assert backend.chat(messages) == "ok"
        elapsed = time.perf_counter() - t0
    assert len(server.requests) == 4
    assert elapsed >= 0.5 + 0.05 + 0.1 + 0.2  # the time-out plus three growing waits


def test_permanent_500_fails_with_the_endpoint_named():
    with ChatServer([], default=status(500, "model crashed")) as server:
        backend = backend_for(server, max_retries=2)
        with pytest.raises(BackendError) as info:
            backend.chat([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3  # 1 + max_retries, then it stops
    message = str(info.value)
    assert server.endpoint in message and "HTTP 500" in message and "model crashed" in message
    assert isinstance(info.value, DaldaError)


def test_unreachable_endpoint_is_bounded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIChatBackend("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, base_delay=0.001)
    with pytest.raises(BackendError, match=f"127.0.0.1:{port}/v1/chat/completions.*2 attempt"):
        backend.chat([{"role": "user", "content": "hi"}])


def test_auth_errors_are_not_retried_and_keys_come_from_the_environment(monkeypatch):
    messages = [{"role": "user", "content": "hi"}]
    monkeypatch.setenv("MY_LLM_KEY", "secret")
    with ChatServer([], default=reply("ok"), api_key="secret") as server:
        with pytest.raises(BackendError, match="HTTP 401"):
            backend_for(server).chat(messages)  # no key
        assert len(server.requests) == 1
        assert backend_for(server, api_key_env="MY_LLM_KEY").chat(messages) == "ok"
        assert server.requests[-1].headers["authorization"] == "Bearer secret"
        azure = backend_for(server, api_key_env="MY_LLM_KEY", azure=True, api_version="2024-10-21")
        assert azure.chat(messages) == "ok"
        assert server.requests[-1].headers["api-key"] == "secret"
        assert "authorization" not in server.requests[-1].headers
        assert server.requests[-1].path == "/v1/chat/completions?api-version=2024-10-21"
        assert "response_format" not in server.requests[-1].body
        assert backend_for(server, api_key="secret", json_mode=True).chat(messages) == "ok"
        assert server.requests[-1].body["response_format"] == {"type": "json_object"}
    assert "secret" not in repr(azure)


def test_resume_after_interruption_keeps_finished_prompts(tmp_path, clip_tok):
    out = tmp_path / "bank.json"
    names = ["cat", "dog", "parrot"]
    # round 1 succeeds, then the endpoint goes down for good
    with ChatServer([per_class(good)], default=status(500)) as server:
        with pytest.raises(BackendError, match=server.endpoint):
            generate_prompt_bank(names, backend_for(server, max_retries=1), m=3, tokenizer=clip_tok, out=out)
    partial = PromptBank.load(out)
    assert partial.prompts == {n: [good(n, 1)] for n in names}
    assert partial.provenance["complete"] is False and partial.provenance["short"] == {n: 1 for n in names}

    with ChatServer([], default=per_class(lambda n, call: good(n, call + 1))) as server:
        bank = generate_prompt_bank(names, backend_for(server), m=3, tokenizer=clip_tok, out=out, resume_from=out)
    assert len(server.requests) == 2  # only the two missing rounds
    assert bank.prompts == {n: [good(n, 1), good(n, 2), good(n, 3)] for n in names}
    assert bank.provenance["complete"] is True and "short" not in bank.provenance
    assert bank.provenance["history"][0]["complete"] is False
    assert PromptBank.load(out) == bank


def test_resume_rejects_a_bank_of_other_classes(tmp_path, clip_tok):
    other = PromptBank({"horse": ["a horse in a field"]}).save(tmp_path / "other.json")
    with pytest.raises(InputError, match="horse"):
        generate_prompt_bank(["cat"], TemplateBackend(), m=1, tokenizer=clip_tok, resume_from=other)


def test_endless_garbage_stops_with_a_report(tmp_path, clip_tok):
    out = tmp_path / "bank.json"
    with ChatServer([], default=reply("I'm sorry, I cannot help with that.")) as server:
        with pytest.raises(IncompletePromptBankError) as info:
            generate_prompt_bank(["cat", "dog"], backend_for(server), m=2, max_rounds=3, tokenizer=clip_tok, out=out)
    assert len(server.requests) == 3
    err = info.value
    assert err.short == {"cat": 0, "dog": 0}
    assert "2 of 2 classes are short" in str(err) and "'cat': 0/2" in str(err) and "unusable" in str(err)
    assert str(out) in str(err)
    assert PromptBank.load(out).provenance["short"] == {"cat": 0, "dog": 0}

    with ChatServer([], default=reply_json({"cat": good("cat", 0)})) as server:
        bank = generate_prompt_bank(["cat", "dog"], backend_for(server), m=2, max_rounds=2, tokenizer=clip_tok,
                                    allow_short=True)
    assert bank["cat"] == [good("cat", 0)]  # the repeat in round 2 was rejected as a duplicate
    assert bank.provenance["short"] == {"cat": 1, "dog": 0} and bank.provenance["complete"] is False


def test_long_class_lists_are_chunked(clip_tok):
    names = [f"class {c}" for c in "abcdefg"]
    with ChatServer([], default=per_class(good)) as server:
        bank = generate_prompt_bank(names, backend_for(server), m=1, chunk_size=3, tokenizer=clip_tok)
    assert [r.requested for r in server.requests] == [names[0:3], names[3:6], names[6:7]]
    assert json.dumps(names) not in server.requests[0].user_message  # the chunk only, to fit the context
    assert all(len(bank[n]) == 1 for n in names)


def test_template_backend(clip_tok, tmp_path):
    bank = generate_prompt_bank(["cat", "sea lion"], TemplateBackend("a photo of a {}"), m=10, tokenizer=clip_tok,
                                out=tmp_path / "t.json")
    assert bank.prompts == {"cat": ["a photo of a cat"], "sea lion": ["a photo of a sea lion"]}
    assert bank.provenance["backend"] == "template" and bank.provenance["complete"] is True
    huge = " ".join(["enormous"] * 80) + " cat"
    with pytest.raises(IncompletePromptBankError, match="too long"):
        generate_prompt_bank([huge], TemplateBackend(), tokenizer=clip_tok)


def test_parse_backend(monkeypatch):
    b = parse_backend("openai:llama3.1:8b", base_url="http://localhost:11434/v1/")
    assert isinstance(b, OpenAIChatBackend) and b.model == "llama3.1:8b"
    assert b.endpoint == "http://localhost:11434/v1/chat/completions"
    with pytest.raises(InputError, match="OPENAI_API_KEY"):
        parse_backend("openai:gpt-4o-mini")  # the real API needs a key
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert parse_backend("openai:gpt-4o-mini").endpoint == "https://api.openai.com/v1/chat/completions"
    assert parse_backend("hf:/models/qwen", device="cuda:1").device == "cuda:1"
    assert parse_backend("template").template == "a photo of a {}"
    assert parse_backend("template:a drawing of a {}").template == "a drawing of a {}"
    with pytest.raises(InputError, match="openai backend only"):
        parse_backend("hf:/models/qwen", base_url="http://x/v1")
    with pytest.raises(InputError, match="unknown LLM backend 'azure:x'"):
        parse_backend("azure:x")
    with pytest.raises(InputError, match="model name"):
        parse_backend("openai:")
    with pytest.raises(InputError, match="http"):
        parse_backend("openai:m", base_url="localhost:8000")


def test_import_is_light():
    code = (
        "import sys, dalda_aug.prompts, dalda_aug.cli.prompts;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# -- hf backend with a tiny random chat model ------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_chat_lm(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer and a chat template, saved like a real model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-chat-lm")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["Write one new sentence for each class. Answer with one JSON object."] * 10, trainer)
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=template
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_hf_backend_garbage_is_rejected_and_bounded(tiny_chat_lm, clip_tok, tmp_path):
    backend = parse_backend(f"hf:{tiny_chat_lm}")
    backend.max_new_tokens = 24  # keep the CPU test fast
    with pytest.raises(IncompletePromptBankError) as info:
        generate_prompt_bank(["cat", "dog"], backend, m=2, max_rounds=2, tokenizer=clip_tok, out=tmp_path / "b.json")
    assert info.value.short == {"cat": 0, "dog": 0}
    assert all("unusable" in why for whys in info.value.reasons.values() for why in whys)
    assert backend._calls == 2  # one request per round, then it stops
    assert info.value.bank.provenance["backend"] == "hf" and info.value.bank.provenance["model"] == str(tiny_chat_lm)


def test_hf_backend_is_seeded_and_leaves_the_global_rng_alone(tiny_chat_lm):
    import torch

    messages = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "A cat, please."}]
    state = torch.random.get_rng_state()
    a = HFChatBackend(str(tiny_chat_lm), max_new_tokens=16, seed=3)
    first = a.chat(messages)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert HFChatBackend(str(tiny_chat_lm), max_new_tokens=16, seed=3).chat(messages) == first
    assert a.chat(messages) != first  # the next call samples anew
    assert "Answer in JSON" not in first  # only the new tokens come back


def test_hf_backend_needs_a_chat_template(tiny_chat_lm, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_chat_lm, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(InputError, match="no chat template"):
        HFChatBackend(str(folder)).chat([{"role": "user", "content": "hi"}])
    with pytest.raises(DaldaError, match="nowhere"):
        HFChatBackend(str(tmp_path / "nowhere")).chat([{"role": "user", "content": "hi"}])


# -- the command -----------------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    from dalda_aug.cli.prompts import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["prompts", *argv])
    return args.func(args)


def test_cli_data_folder_openai(tmp_path, clip_tokenizer_dir, capsys):
    data = tmp_path / "pets"
    for folder in ("american_bulldog", "Abyssinian", "wildcat"):
        (data / folder).mkdir(parents=True)
        noise(0).save(data / folder / "0.png")  # a class folder holds an image (an empty one is refused)
    (tmp_path / "desc.txt").write_text("Photos de animaux domestiques — Oxford-IIIT Pets.\n", encoding="utf-8")
    out = tmp_path / "out" / "prompts.json"
    with ChatServer([], default=per_class(good)) as server:
        rc = run_cli("--data", str(data), "--out", str(out), "-M", "2", "--llm", "openai:test-model",
                     "--base-url", server.base_url, "--retry-delay", "0.001", "--description-file",
                     str(tmp_path / "desc.txt"), "--tokenizer", str(clip_tokenizer_dir))
    assert rc == 0
    bank = PromptBank.load(out)
    assert bank.class_names == ["Abyssinian", "american bulldog", "wildcat"]
    assert bank["american_bulldog"] == [good("american bulldog", 1), good("american bulldog", 2)]
    assert bank.provenance["description"] == "Photos de animaux domestiques — Oxford-IIIT Pets."
    assert "Oxford-IIIT Pets" in server.requests[0].user_message
    captured = capsys.readouterr()
    assert f"wrote 6 prompts for 3 classes (openai) -> {out}" in captured.out
    assert "prompts" in captured.err  # the progress bar


def test_cli_short_classes_exit_1_then_resume(tmp_path, clip_tokenizer_dir, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n\ndog\n", encoding="utf-8")
    out = tmp_path / "prompts.json"
    common = ["--classes", str(classes), "--out", str(out), "-M", "2", "--llm", "openai:test-model",
              "--retry-delay", "0.001", "--tokenizer", str(clip_tokenizer_dir), "--no-progress"]
    only_cat = per_class(lambda n, call: good(n, call) if n == "cat" else "The dog is here. It barks.")
    with ChatServer([], default=only_cat) as server:
        rc = run_cli(*common, "--base-url", server.base_url, "--max-rounds", "2")
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 of 2 classes are short" in err and "'dog': 0/2" in err and "more than one sentence" in err
    assert PromptBank.load(out)["cat"] == [good("cat", 1), good("cat", 2)]

    with ChatServer([], default=per_class(good)) as server:
        rc = run_cli(*common, "--base-url", server.base_url)
    assert rc == 0
    assert "resuming from" in capsys.readouterr().err
    assert [r.requested for r in server.requests] == [["dog"], ["dog"]]
    bank = PromptBank.load(out)
    assert bank["cat"] == [good("cat", 1), good("cat", 2)] and bank["dog"] == [good("dog", 1), good("dog", 2)]


def test_cli_template_with_models_tokenizer(tmp_path, clip_tokenizer_dir):
    import shutil

    from dalda_aug.config import ModelConfig

    sd = tmp_path / "sd"
    shutil.copytree(clip_tokenizer_dir, sd / "tokenizer")  # an SD pipeline folder's tokenizer/
    models = ModelConfig(base=str(sd)).save(tmp_path / "models.json")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\nsea lion\n", encoding="utf-8")
    out = tmp_path / "prompts.json"
    assert run_cli("--classes", str(classes), "--out", str(out), "--llm", "template:a drawing of a {}",
                   "--models", str(models), "--no-progress") == 0
    assert PromptBank.load(out).prompts == {"cat": ["a drawing of a cat"], "sea lion": ["a drawing of a sea lion"]}


def test_cli_errors_name_the_culprit(tmp_path, capsys):
    with pytest.raises(MissingFileError, match="nope.txt"):
        run_cli("--classes", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o.json"), "--llm", "template")
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n", encoding="utf-8")
    with pytest.raises(InputError, match="dup.txt:3"):
        run_cli("--classes", str(dup), "--out", str(tmp_path / "o.json"), "--llm", "template")
    (tmp_path / "c.txt").write_text("cat\n", encoding="utf-8")
    with pytest.raises(InputError, match="openai backend only"):
        run_cli("--classes", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o.json"), "--llm", "hf:x",
                "--base-url", "http://127.0.0.1:1/v1")
    with pytest.raises(MissingFileError, match="no-data"):
        run_cli("--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "o.json"), "--llm", "template")
    with pytest.raises(MissingFileError, match="no-tok"):
        run_cli("--classes", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o.json"), "--llm", "template",
                "--tokenizer", str(tmp_path / "no-tok"))


def test_default_tokenizer_is_built_once_offline(tmp_path, monkeypatch, clip_tok):
    monkeypatch.setenv("DALDA_AUG_CACHE", str(tmp_path / "cache"))
    tok = load_clip_tokenizer()
    folder = tmp_path / "cache" / "clip-tokenizer"
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    text = DEFAULT_PREFIX + "A fluffy cat sleeping on a red sofa."
    assert tok(text)["input_ids"] == clip_tok(text)["input_ids"]
    load_clip_tokenizer()
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "clip-tokenizer"]


# -- fidelity to the paper and the reference code (issue 12) --------------------------------------
def test_table4_sampling_is_sent_explicitly(clip_tok):
    # Paper Table 4 / reference generate_prompt_by_LLM.py get_gpt_response(): temperature=1,
    # top_p=1, frequency_penalty=0, presence_penalty=0.
    with ChatServer([], default=per_class(good)) as server:
        generate_prompt_bank(["cat", "dog"], backend_for(server), m=1, tokenizer=clip_tok)
    body = server.requests[0].body
    assert (body["temperature"], body["top_p"], body["frequency_penalty"], body["presence_penalty"]) == (1.0, 1.0, 0.0, 0.0)
    raw = json.dumps(body)
    assert '"top_p": 1.0' in raw and '"frequency_penalty": 0.0' in raw and '"presence_penalty": 0.0' in raw


def test_hf_backend_samples_at_t1_top_p1_whatever_the_generation_config(tiny_chat_lm, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "lm"
    shutil.copytree(tiny_chat_lm, folder)
    # a model whose own generation config would sample almost greedily, with a repetition penalty
    (folder / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.05, "top_k": 1, "top_p": 0.1, "repetition_penalty": 1.5,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    messages = [{"role": "user", "content": "A cat, please."}]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)  # temperature 1, no top-k/top-p cut, no penalty
    got, expected = [], []
    for seed in range(6):
        got.append(HFChatBackend(str(folder), max_new_tokens=1, seed=seed).chat(messages))
        g = torch.Generator().manual_seed(seed)
        token = int(torch.multinomial(probs, 1, generator=g))
        expected.append(tok.decode([token], skip_special_tokens=True))
    assert got == expected
    assert len(set(got)) > 1  # top_k=1 from the model's config would give one token every time


def test_reference_instruction_asks_only_what_the_reference_asks(clip_tok):
    with ChatServer([], default=per_class(good)) as server:
        bank = generate_prompt_bank(PETS, backend_for(server), m=1, description="Pet photos.", tokenizer=clip_tok,
                                    instruction="reference")
    assert bank.provenance["instruction"] == "reference"
    system, user = (m["content"] for m in server.requests[0].body["messages"])
    assert "one sentence" in system.lower() and "must not include any other class" in system
    assert "JSON" in system
    assert "30 words" not in system + user and "exactly as written" not in system + user
    assert "Dataset description:\nPet photos." in user
    assert json.dumps(PETS) in user  # the full class list, and the classes asked for
    assert server.requests[0].requested == PETS


def test_default_instruction_is_unchanged_and_recorded(clip_tok):
    with ChatServer([], default=per_class(good)) as server:
        bank = generate_prompt_bank(["cat", "dog"], backend_for(server), m=1, tokenizer=clip_tok)
    assert "at most 30 words" in server.requests[0].user_message
    assert bank.provenance["instruction"] == "default"


def test_instruction_file_placeholders_and_roles(tmp_path, clip_tokenizer_dir):
    text = ("[system]\nYou are terse. Output JSON like {\"class\": \"sentence\"}.\n[user]\n"
            "About: {description}\nAll {n_classes}: {classes}\nNow {n_requested}: {requested}\n{notes}\n")
    (tmp_path / "ins.txt").write_text(text, encoding="utf-8")
    (tmp_path / "c.txt").write_text("cat\nsea lion\n", encoding="utf-8")
    out = tmp_path / "bank.json"
    first = per_class(lambda n, call: good(n, call) if n == "cat" else "A cat and a sea lion.")
    with ChatServer([first], default=per_class(good)) as server:
        rc = run_cli("--classes", str(tmp_path / "c.txt"), "--out", str(out), "-M", "1", "--llm",
                     "openai:test-model", "--base-url", server.base_url, "--retry-delay", "0.001",
                     "--description", "Zoo photos.", "--instruction-file", str(tmp_path / "ins.txt"),
                     "--tokenizer", str(clip_tokenizer_dir), "--no-progress")
    assert rc == 0
    # written out by hand from the file above
    assert server.requests[0].body["messages"] == [
        {"role": "system", "content": 'You are terse. Output JSON like {"class": "sentence"}.'},
        {"role": "user", "content": 'About: Zoo photos.\nAll 2: ["cat", "sea lion"]\n'
                                    'Now 2: ["cat", "sea lion"]'},
    ]
    assert server.requests[1].body["messages"][1]["content"] == (
        'About: Zoo photos.\nAll 2: ["cat", "sea lion"]\nNow 1: ["sea lion"]\n'
        "- \"sea lion\": it names another class: 'cat'")
    prov = PromptBank.load(out).provenance
    assert prov["instruction"] == f"file:{tmp_path / 'ins.txt'}" and prov["instruction_text"] == text
    (tmp_path / "bad.txt").write_text("Describe the classes, please.", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.txt.*\{requested\}"):
        run_cli("--classes", str(tmp_path / "c.txt"), "--out", str(out), "--llm", "openai:m",
                "--base-url", "http://127.0.0.1:1/v1", "--instruction-file", str(tmp_path / "bad.txt"))
    with pytest.raises(MissingFileError, match="nope.txt"):
        run_cli("--classes", str(tmp_path / "c.txt"), "--out", str(out), "--llm", "openai:m",
                "--base-url", "http://127.0.0.1:1/v1", "--instruction-file", str(tmp_path / "nope.txt"))


# The paper's Table 5, verbatim. The reference's prompt_for_LLM/llm_prompt_1_user_*.txt files hold the
# same texts except that its Caltech file writes "Caltech101" where Table 5 writes "Caltech-101".
TABLE5 = {
    "pets": "We have created a 37 category pet dataset with roughly 200 images for each class. The images "
            "have a large variations in scale, pose and lighting.",
    "caltech101": "Caltech-101 dataset is pictures of objects belonging to 101 categories. About 40 to 800 images "
                  "per category. Most categories have about 50 images. The size of each image is roughly "
                  "300 x 200 pixels. We have carefully clicked outlines of each object in these pictures.",
    "flowers102": "We have created a 102 category dataset, consisting of 102 flower categories. The flowers "
                  "chosen to be flower commonly occuring in the United Kingdom. Each class consists of "
                  "between 40 and 258 images.",
}


@pytest.mark.parametrize("preset", sorted(TABLE5))
def test_preset_supplies_the_table5_description(preset, tmp_path, clip_tokenizer_dir):
    (tmp_path / "c.txt").write_text("cat\ndog\n", encoding="utf-8")
    with ChatServer([], default=per_class(good)) as server:
        rc = run_cli("--classes", str(tmp_path / "c.txt"), "--out", str(tmp_path / "b.json"), "-M", "1",
                     "--llm", "openai:test-model", "--base-url", server.base_url, "--preset", preset,
                     "--tokenizer", str(clip_tokenizer_dir), "--no-progress")
    assert rc == 0
    assert f"Dataset description: {TABLE5[preset]}\n" in server.requests[0].user_message
    assert PromptBank.load(tmp_path / "b.json").provenance["description"] == TABLE5[preset]


def test_caltech_preset_shows_the_references_llm_class_names(tmp_path, clip_tokenizer_dir):
    # Reference: datasets/caltech101.py lists 'bass', 'faces', 'faces easy'; its LLM prompt file
    # llm_prompt_1_user_caltech.txt shows 'bass fish', 'face', 'closed-up face' in their place.
    data = tmp_path / "101_ObjectCategories"
    for folder in ("accordion", "bass", "Faces", "Faces_easy"):
        (data / folder).mkdir(parents=True)
        noise(0).save(data / folder / "0.png")  # a class folder holds an image (an empty one is refused)
    out = tmp_path / "b.json"
    with ChatServer([], default=per_class(good)) as server:
        rc = run_cli("--data", str(data), "--out", str(out), "-M", "1", "--llm", "openai:test-model",
                     "--base-url", server.base_url, "--preset", "caltech101", "--instruction", "reference",
                     "--tokenizer", str(clip_tokenizer_dir), "--no-progress")
    assert rc == 0
    shown = ["Faces", "Faces easy", "accordion", "bass"]  # find_classes sorts the folders
    llm = ["face", "closed-up face", "accordion", "bass fish"]
    assert server.requests[0].requested == llm
    assert TABLE5["caltech101"] in server.requests[0].user_message
    bank = PromptBank.load(out)
    assert bank.class_names == shown
    assert {n: bank[n] for n in shown} == {n: [good(s, 1)] for n, s in zip(shown, llm)}
    assert bank.provenance["llm_names"] == {"Faces": "face", "Faces easy": "closed-up face", "bass": "bass fish"}


# -- the API key never leaves in a message, a log or a file (issue 11, points 2 and 3) -------------
KEY = "sk-live-Zx81-very-secret"


@pytest.mark.parametrize("code", [401, 500])
def test_echoed_key_is_redacted_from_errors(code, monkeypatch, capsys, tmp_path):
    from dalda_aug.cli import main
    from llm_server import echo_auth

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    (tmp_path / "c.txt").write_text("cat\n", encoding="utf-8")
    with ChatServer([], default=echo_auth(code)) as server:
        rc = main(["prompts", "--classes", str(tmp_path / "c.txt"), "--out", str(tmp_path / "b.json"),
                   "--llm", "openai:test-model", "--base-url", server.base_url, "--retry-delay", "0.001",
                   "--max-retries", "1", "--no-progress"])
        assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # the server did see it
    err = capsys.readouterr().err
    assert rc == 2 and f"HTTP {code}" in err and err.count("\n") == 1
    assert KEY not in err and "Bearer sk-" not in err and "[REDACTED]" in err
    assert not (tmp_path / "b.json").exists() or KEY not in (tmp_path / "b.json").read_text()


def test_echoed_key_in_a_200_error_body_or_answer_is_redacted(tmp_path, clip_tok):
    from llm_server import echo_auth

    with ChatServer([], default=echo_auth(200)) as server:
        with pytest.raises(BackendError) as info:
            backend_for(server, api_key=KEY).chat([{"role": "user", "content": "hi"}])
    assert "answered with an error" in str(info.value) and KEY not in str(info.value)
    assert "[REDACTED]" in str(info.value)
    # a 200 answer whose text carries the header: the key reaches neither the bank file nor the report
    out = tmp_path / "bank.json"
    with ChatServer([], default=echo_auth(200, as_error=False)) as server:
        with pytest.raises(IncompletePromptBankError) as info:
            generate_prompt_bank(["cat"], backend_for(server, api_key=KEY), m=1, max_rounds=1, tokenizer=clip_tok,
                                 out=out)
    assert KEY not in str(info.value) and KEY not in out.read_text(encoding="utf-8")
    assert KEY not in json.dumps(info.value.reasons)


def test_redact_bearer_values_and_the_key():
    from dalda_aug.prompts import redact

    assert redact(f"Authorization: Bearer abc.def-123 and {KEY}", [KEY]) == \
        "Authorization: Bearer [REDACTED] and [REDACTED]"
    assert redact('{"h": "bearer xyz"}') == '{"h": "bearer [REDACTED]"}'


def test_cross_origin_redirect_is_refused_without_sending_the_key(monkeypatch):
    from llm_server import redirect

    with ChatServer([], default=reply("stolen")) as other:
        with ChatServer([], default=redirect(other.endpoint, 302)) as server:
            backend = backend_for(server, api_key=KEY)
            with pytest.raises(BackendError, match="redirected .*another origin") as info:
                backend.chat([{"role": "user", "content": "hi"}])
            assert len(server.requests) == 1
        assert other.hits == []  # nothing, and so no Authorization header, reached the other origin
    assert other.endpoint in str(info.value) and KEY not in str(info.value)


def test_same_origin_redirect_is_followed(monkeypatch):
    from llm_server import redirect

    with ChatServer([], default=reply("ok")) as server:
        server.script = [redirect(server.endpoint + "?moved=1", 307)]
        assert backend_for(server, api_key=KEY).chat([{"role": "user", "content": "hi"}]) == "ok"
        assert [r.path for r in server.requests] == ["/v1/chat/completions", "/v1/chat/completions?moved=1"]
        assert server.requests[1].headers["authorization"] == f"Bearer {KEY}"


def test_a_password_in_the_base_url_is_redacted_too(tmp_path):
    backend = OpenAIChatBackend("m", base_url="http://user:pw-Secret-9@127.0.0.1:1/v1", max_retries=0, timeout=2)
    with pytest.raises(BackendError) as info:
        backend.chat([{"role": "user", "content": "hi"}])
    assert "pw-Secret-9" not in str(info.value) and "[REDACTED]" in str(info.value)
    assert "pw-Secret-9" not in json.dumps(backend.describe()) and "pw-Secret-9" not in repr(backend)
