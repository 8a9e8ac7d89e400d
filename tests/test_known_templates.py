"""fermi's table of known chat templates (fermi/template.py KNOWN): a model whose file
carries no template gets its family's turn format. Each family's template renders as
transformers' apply_chat_template renders the official one (tests/data), a model
without a template gets its family's and stops at its end-of-turn token, and a raw
prompt stays raw."""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from fermi import sources
from fermi.config import ModelConfig
from fermi.engine import Engine
from fermi.errors import FermiError
from fermi.template import CHATML, ChatTemplate
from fermi.tokenizer import Tokenizer as FermiTokenizer

DATA = Path(__file__).parent / "data"
OFFICIAL = {name: json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))
            for name in ("gemma-3-270m-it", "phi-3.5-mini-instruct")}
FAMILIES = {"gemma3": "gemma-3-270m-it", "gemma3_text": "gemma-3-270m-it", "phi3": "phi-3.5-mini-instruct"}
END_OF_TURN = {"gemma3": "<end_of_turn>", "gemma3_text": "<end_of_turn>", "phi3": "<|end|>", "qwen2": "<|im_end|>"}
SPECIAL = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>",
           "<|assistant|>", "<|end|>", "<|im_start|>", "<|im_end|>"]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi!\n"}],
    "multi-turn": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": " It is 4. "}, {"role": "user", "content": "And 3+3?"}],
    "empty-system": [{"role": "system", "content": ""}, {"role": "user", "content": "x"},
                     {"role": "assistant", "content": "y"}],
}


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges (one token a byte) plus the families' turn tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tok


def reference(official: dict, messages, add_generation_prompt=True) -> str:
    """transformers' apply_chat_template with the official template and special tokens."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token=official["bos_token"],
                                 eos_token=official["eos_token"])
    return hf.apply_chat_template(messages, chat_template=official["chat_template"], tokenize=False,
                                  add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_table_renders_as_the_official_template(family, conversation, add_generation_prompt):
    official = OFFICIAL[FAMILIES[family]]
    messages = CONVERSATIONS[conversation]
    if family.startswith("gemma") and conversation == "empty-system":
        messages = messages[1:] + [{"role": "user", "content": "z"}]  # (Gemma: a system turn is not skipped)
    t = ChatTemplate(None, official["bos_token"], official["eos_token"], family=family)
    assert t.render(messages, "auto", add_generation_prompt) == reference(official, messages, add_generation_prompt)


def test_gemma_folds_the_system_message_into_the_first_user_turn():
    t = ChatTemplate(None, "<bos>", "<eos>", family="gemma3_text")
    assert t.render(CONVERSATIONS["multi-turn"]) == (
        "<bos><start_of_turn>user\nBe kind.\n\n2+2?<end_of_turn>\n<start_of_turn>model\nIt is 4.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(FermiError, match="alternate"):  # Gemma's own rule, raised as the template raises it
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral", None])
def test_chatml_for_qwen_llama_and_any_other_family(family):
    t = ChatTemplate(None, family=family)
    assert t.source == CHATML
    assert t.render(CONVERSATIONS["user"]) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"


def test_a_model_s_own_template_wins():
    t = ChatTemplate("{{ 'own' }}", family="gemma3")
    assert t.render([]) == "own" and t.end_of_turn is None


def files(family: str, template: str | None = None) -> sources.ModelFiles:
    """A ModelFiles of `family` (no weights: the engine's text side only)."""
    config = ModelConfig(model_type=family, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, vocab_size=512, eos_token_id=SPECIAL.index("<eos>") + 256)
    official = OFFICIAL.get(FAMILIES.get(family), {})
    tok = FermiTokenizer(byte_tokenizer(), config.eos_ids, official.get("bos_token"), official.get("eos_token"))
    return sources.ModelFiles(name=family, path=Path("."), config=config, tokenizer=tok, chat_template=template)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_of_a_model_without_template_uses_its_family_s(family):
    eng = Engine(files(family), runtime=None)
    messages = CONVERSATIONS["multi-turn"]
    p = eng.prompt(messages, "auto")
    assert p.text == reference(OFFICIAL[FAMILIES[family]], messages)
    assert not p.thinking and not p.in_reasoning  # no thinking by default
    assert eng.tokenizer.token_id(END_OF_TURN[family]) in eng.eos_ids
    # the file's own template, when it has one, and no extra stop
    own = Engine(files(family, "{{ messages[0]['content'] }}"), runtime=None)
    assert own.prompt(messages).text == "Be kind." and eng.tokenizer.token_id(END_OF_TURN[family]) not in own.eos_ids


def test_raw_prompt_stays_raw():
    """`fermi run --raw`: the prompt as it is, the reply unsplit, whatever the table says."""
    eng = Engine(files("gemma3_text"), runtime=None)
    text = "Once upon a time <start_of_turn>"
    req = eng.request([], "auto", 8, prompt=eng.raw_prompt(text))
    assert req.raw and req.ids == eng.tokenizer.encode(text) and eng.tokenizer.decode(req.ids) == text


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "phi3"])
def test_a_directory_without_template_gets_its_family_s(tmp_path, family):
    """From disk: config.json names the family, tokenizer_config.json has no chat_template."""
    config = {"model_type": family, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 512}
    config.update({"gemma3_text": {"sliding_window": 512, "query_pre_attn_scalar": 8, "rope_local_base_freq": 1e4,
                                   "layer_types": ["full_attention"]},
                   "phi3": {"original_max_position_embeddings": 512, "rope_scaling": None}}.get(family, {}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # listed, never read: the engine's text side only
    (tmp_path / "tokenizer.json").write_text(byte_tokenizer().to_str())
    bos, eos = {"qwen2": (None, "<|endoftext|>"), "gemma3_text": ("<bos>", "<eos>"),
                "phi3": ("<s>", "<|endoftext|>")}[family]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    try:
        model = sources.from_dir(tmp_path)
    except FermiError as e:
        if "unsupported architecture" in str(e):
            pytest.skip(f"fermi does not run {family} yet")
        raise
    assert model.chat_template is None
    eng = Engine(model, runtime=None)
    messages = CONVERSATIONS["system"]
    chatml = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n  Hi!\n<|im_end|>\n"
              "<|im_start|>assistant\n")
    want = reference(OFFICIAL[FAMILIES[family]], messages) if family in FAMILIES else chatml
    assert eng.prompt(messages).text == want
    assert eng.tokenizer.token_id(END_OF_TURN[family]) in eng.eos_ids
