"""Tests of the ``text`` conditioner: the conformance kit in both attention modes and the pretrained
mode, plus bad input, padding, caption sensitivity and the local-file loading rules."""

from __future__ import annotations

import warnings

import pytest
import torch

from ldmkit import ConditioningStack, ConditionInputError
from ldmkit.testing import check_conditioner, conformance_tests
from ldmkit_text import CLIP_VOCAB_SIZE, SPEC, TextConfig

TINY = {"width": 32, "layers": 1, "heads": 2, "context_length": 16}
LONG = " ".join(["a red circle above a blue square"] * 3)  # 21 BPE tokens > 14
BAD = [3, None, 2.5, True, ["a red circle"], b"\xff\xfe", "a red\x00circle", "a \x1b[31mred circle", LONG]

TestTextConformance = conformance_tests(SPEC, config=TINY, invalid_inputs=BAD)
TestTextCausalConformance = conformance_tests(SPEC, config={**TINY, "causal": True}, invalid_inputs=BAD)
TestTextNoBlocksConformance = conformance_tests(SPEC, config={**TINY, "layers": 0}, invalid_inputs=BAD)

#: The longest caption the shapes world writes ("cyan" is two BPE tokens): 12 + start/end = 14.
LONGEST_SHAPES_CAPTION = "a large cyan triangle right of a large cyan triangle"


def build(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return SPEC.build(TextConfig(**{**TINY, **overrides}), None).eval()


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (7, "expected a string, got int"),
        (None, "expected a string, got NoneType"),
        (["a", "b"], "expected a string, got list"),
        (b"\xff", "not valid UTF-8"),
        ("a red\x00circle", r"control character \(U\+0000\) at position 5"),
        ("\x07", r"U\+0007"),
        ("a \ud800 circle", "lone surrogate"),
        (LONG, "21 BPE tokens long, more than context_length 16"),
    ],
)
def test_bad_input_names_field_sample_and_problem(bad, problem):
    c = build()
    with pytest.raises(ConditionInputError, match=problem) as info:
        c.encode(["a red circle", bad])
    err = info.value
    assert (err.field, err.index) == ("caption", 1)
    assert "caption" in str(err) and "sample 1" in str(err) and err.allowed


def test_error_names_a_custom_key():
    c = build(key="prompt")
    with pytest.raises(ConditionInputError, match="condition 'prompt' \\(sample 0\\)"):
        c.encode([42])


def test_whitespace_controls_and_utf8_bytes_are_accepted():
    c = build()
    out = c.encode(["a red\tcircle\n", "a red circle".encode("utf-8"), bytearray(b"a red circle"), "a red circle"])
    assert torch.allclose(out.value[0], out.value[3]) and torch.allclose(out.value[1], out.value[3])
    assert torch.allclose(out.value[2], out.value[3])


def test_overflow_truncate_warns_and_keeps_the_end_token():
    c = build(overflow="truncate")
    with pytest.warns(UserWarning, match="truncated to 14"):
        ids, mask = c.prepare([LONG])
    assert mask.all() and ids[0, -1].item() == c._eot and ids[0, 0].item() == c._sot


def test_longest_shapes_caption_fits_16_tokens():
    c = build()
    ids, mask = c.prepare([LONGEST_SHAPES_CAPTION])
    assert int(mask.sum()) == 14


# -- padding and the mask --------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_mask_marks_start_to_end_and_padding_does_not_leak(causal):
    c = build(causal=causal)
    captions = ["a red circle", "a small red circle above a large blue square", ""]
    ids, mask = c.prepare(captions)
    lengths = mask.sum(1).tolist()
    assert lengths == [5, 11, 2]
    for i, n in enumerate(lengths):  # True exactly from the start token through the end token
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert ids[i, 0] == c._sot and ids[i, n - 1] == c._eot
    out = c((ids, mask))
    assert torch.equal(out.mask, mask)
    assert (out.value[~mask] == 0).all()  # padding positions are zero
    garbage = ids.clone()
    garbage[~mask] = torch.randint(1, CLIP_VOCAB_SIZE, (int((~mask).sum()),))
    again = c((garbage, mask))  # what sits in padding positions changes nothing
    assert torch.allclose(again.value, out.value, atol=1e-6)


def test_bidirectional_tokens_see_later_tokens_causal_do_not():
    for causal, first_token_changes in ((False, True), (True, False)):
        c = build(causal=causal)
        out = c.encode(["a red circle", "a red square"]).value
        # position 0 is the start token: only bidirectional attention lets it see the shape word
        assert (not torch.allclose(out[0, 0], out[1, 0], atol=1e-6)) == first_token_changes


# -- captions matter -------------------------------------------------------------------------------
def test_different_captions_give_different_outputs():
    c = build()
    caps = ["a red circle", "a blue circle", "a red square", "a red circle above a blue square",
            "a blue square above a red circle"]
    out = c.encode(caps).value.flatten(1)
    for i in range(len(caps)):
        for j in range(i + 1, len(caps)):
            assert not torch.allclose(out[i], out[j], atol=1e-4), (caps[i], caps[j])


def test_tokenizer_lowercases_and_folds_whitespace():
    c = build()
    out = c.encode(["A  Red CIRCLE", "a red circle"]).value
    assert torch.allclose(out[0], out[1])


def test_empty_caption_is_the_null():
    c = build()
    out = c.encode(["", "   ", "a red circle"])
    null = c.null(3)
    assert torch.allclose(out.value[:2], null.value[:2]) and torch.equal(out.mask[:2], null.mask[:2])
    assert not torch.allclose(out.value[2], null.value[2])
    assert null.mask.sum(1).tolist() == [2, 2, 2]


def test_null_is_learned_through_the_tower():
    c = build().train()
    c.null(2).value.sum().backward()
    assert c.tower.token_embedding.weight.grad is not None
    assert c.tower.token_embedding.weight.grad.abs().sum() > 0


# -- config ----------------------------------------------------------------------------------------
def test_config_ranges():
    with pytest.raises(ValueError, match="divisible by heads"):
        TextConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="allow_pickle"):
        TextConfig(allow_pickle=True)
    with pytest.raises(ValueError):
        TextConfig(context_length=2)
    with pytest.raises(ValueError):
        TextConfig(vocab_size=1000)  # CLIP token ids reach 49407
    with pytest.raises(ValueError):
        TextConfig(overflow="ignore")
    cfg = TextConfig()
    assert (cfg.key, cfg.trainable, cfg.is_causal) == ("caption", True, False)


def test_declared_sizes_wire_the_unet():
    stack = ConditioningStack([build()])
    w = stack.wiring()
    assert (w.context_tokens, w.extra_in_channels, w.vector_dim) == (16, 0, None)


# -- pretrained text towers from local files --------------------------------------------------------
def _tiny_clip_state(width=32, layers=2, heads=2, positions=77, prefix=""):
    """A tiny open_clip text tower (+ the image-tower and CLIP-head keys a full checkpoint carries)."""
    from open_clip.transformer import TextTransformer

    torch.manual_seed(123)
    tower = TextTransformer(context_length=positions, vocab_size=CLIP_VOCAB_SIZE, width=width, heads=heads,
                            layers=layers, output_dim=16, output_tokens=True).eval()
    for p in tower.parameters():  # non-trivial layer norms and biases
        p.data.add_(0.02 * torch.randn_like(p))
    state = {prefix + k: v.clone() for k, v in tower.state_dict().items()}
    state["visual.proj"] = torch.randn(8, 16)
    state["logit_scale"] = torch.tensor(4.6)
    return tower, state


def _pretrained_cfg(path, **extra):
    return {"width": 32, "layers": 2, "heads": 2, "context_length": 16, "pretrained": str(path), **extra}


@pytest.mark.parametrize("prefix", ["", "text."])
def test_pretrained_safetensors_matches_open_clip(tmp_path, prefix):
    from safetensors.torch import save_file

    reference, state = _tiny_clip_state(prefix=prefix)
    path = tmp_path / "clip-text.safetensors"
    save_file(state, str(path))
    cfg = TextConfig(**_pretrained_cfg(path))
    assert cfg.trainable is False and cfg.is_causal  # frozen and causal by default
    c = SPEC.build(cfg, None).eval()
    captions = ["a small red circle above a blue square", "a green triangle", ""]
    out = c.encode(captions)
    with torch.no_grad():
        _, tokens = reference(_clip_tokenize(captions, 77))  # open_clip's own forward, context 77
    for i, n in enumerate(out.mask.sum(1).tolist()):
        assert torch.allclose(out.value[i, :n], tokens[i, :n], atol=1e-5)
    # the stack freezes it (trainable: false) and the conformance kit passes in this mode too
    stack = ConditioningStack([c])
    assert not any(p.requires_grad for p in c.parameters()) and stack.trainable_parameters() == [
        p for p in stack.token_proj.parameters()]
    check_conditioner(SPEC, config=_pretrained_cfg(path), invalid_inputs=BAD[:3])


def _clip_tokenize(captions, context_length):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)(captions)


def test_pretrained_trainable_can_be_set(tmp_path):
    from safetensors.torch import save_file

    _, state = _tiny_clip_state()
    save_file(state, str(tmp_path / "t.safetensors"))
    cfg = TextConfig(**_pretrained_cfg(tmp_path / "t.safetensors", trainable=True, causal=False))
    assert cfg.trainable is True and not cfg.is_causal
    assert TextConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_pickle_is_refused_unless_allowed(tmp_path):
    from safetensors.torch import save_file

    _, state = _tiny_clip_state()
    pt = tmp_path / "clip.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, pt)
    with pytest.raises(ValueError, match="not a safetensors file.*allow_pickle: true"):
        SPEC.build(TextConfig(**_pretrained_cfg(pt)), None)
    # renamed to .safetensors it is still sniffed as a pickle and refused
    disguised = tmp_path / "clip.safetensors"
    disguised.write_bytes(pt.read_bytes())
    with pytest.raises(ValueError, match="allow_pickle"):
        SPEC.build(TextConfig(**_pretrained_cfg(disguised)), None)
    allowed = SPEC.build(TextConfig(**_pretrained_cfg(pt, allow_pickle=True)), None).eval()
    st = tmp_path / "clip2.safetensors"
    save_file(state, str(st))
    safe = SPEC.build(TextConfig(**_pretrained_cfg(st)), None).eval()
    caps = ["a red circle", "a blue square below a green circle"]
    assert torch.allclose(allowed.encode(caps).value, safe.encode(caps).value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ValueError, match="weights_only"):
        SPEC.build(TextConfig(**_pretrained_cfg(path, allow_pickle=True)), None)


def test_pretrained_mismatch_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    _, state = _tiny_clip_state()
    path = tmp_path / "t.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="width 32.*set width: 32"):
        SPEC.build(TextConfig(**{**_pretrained_cfg(path), "width": 64, "heads": 2}), None)
    with pytest.raises(ValueError, match="set layers: 2"):
        SPEC.build(TextConfig(**{**_pretrained_cfg(path), "layers": 3}), None)
    with pytest.raises(ValueError, match="context length is 77"):
        SPEC.build(TextConfig(**{**_pretrained_cfg(path), "context_length": 80}), None)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        SPEC.build(TextConfig(**_pretrained_cfg(tmp_path / "nope.safetensors")), None)
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "image-only.safetensors"))
    with pytest.raises(ValueError, match="no open_clip text tower"):
        SPEC.build(TextConfig(**_pretrained_cfg(tmp_path / "image-only.safetensors")), None)


def test_no_warning_on_normal_captions():
    c = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.encode(["a red circle", LONGEST_SHAPES_CAPTION])


# -- pruned vocabulary -----------------------------------------------------------------------------
CAPTIONS = ["a small red circle above a blue square", "a green triangle", LONGEST_SHAPES_CAPTION, ""]


def pruned_pair():
    from ldmkit_text import caption_token_ids, prune_vocabulary

    full = build(seed=3)
    state = {f"c.{k}": v for k, v in full.state_dict().items()}
    cfg, new_state = prune_vocabulary(full.config, state, caption_token_ids(CAPTIONS), prefix="c.")
    small = SPEC.build(cfg, None).eval()
    small.load_state_dict({k[2:]: v for k, v in new_state.items()})
    return full, small


def test_pruned_vocabulary_encodes_its_captions_exactly_and_is_small():
    full, small = pruned_pair()
    assert small.config.vocab_size == len(small.config.vocabulary) < 30
    assert small.tower.token_embedding.weight.shape[0] == small.config.vocab_size
    with torch.inference_mode():
        a, b = full.encode(CAPTIONS), small.encode(CAPTIONS)
        assert torch.equal(a.value, b.value) and torch.equal(a.mask, b.mask)
        assert torch.equal(full.null(2).value, small.null(2).value)
    assert "cyan" not in small.known_words() and {"red", "triangle", "above"} <= set(small.known_words())


def test_pruned_vocabulary_refuses_unseen_words_listing_known_ones():
    _, small = pruned_pair()
    with pytest.raises(ConditionInputError, match="no token for 'dog'") as info:
        small.encode(["a red circle", "a red dog"])
    assert info.value.index == 1 and "above" in info.value.allowed and "triangle" in info.value.allowed


def test_pruning_a_pretrained_tower_detaches_it_from_its_file(tmp_path):
    from safetensors.torch import save_file

    from ldmkit_text import caption_token_ids, prune_vocabulary

    _, state = _tiny_clip_state()
    path = tmp_path / "t.safetensors"
    save_file(state, str(path))
    full = SPEC.build(TextConfig(**_pretrained_cfg(path, causal=False)), None).eval()
    cfg, new_state = prune_vocabulary(full.config, {f"c.{k}": v for k, v in full.state_dict().items()},
                                      caption_token_ids(CAPTIONS), prefix="c.")
    assert cfg.pretrained is None and cfg.causal is False and cfg.trainable is False
    path.unlink()  # the pruned conditioner needs nothing but its state
    small = SPEC.build(cfg, None).eval()
    small.load_state_dict({k[2:]: v for k, v in new_state.items()})
    with torch.inference_mode():
        assert torch.equal(full.encode(CAPTIONS).value, small.encode(CAPTIONS).value)


def test_pruned_vocabulary_config_rules():
    with pytest.raises(ValueError, match="outside"):
        TextConfig(vocabulary=[1, 2, CLIP_VOCAB_SIZE])
    with pytest.raises(ValueError, match="repeated"):
        TextConfig(vocabulary=[1, 1, 2])
    with pytest.raises(ValueError, match="equal len"):
        TextConfig(vocabulary=[1, 2, 3], vocab_size=5)
    assert TextConfig(vocabulary=[1, 2, 3]).vocab_size == 3
    with pytest.raises(ValueError, match="lacks the start and end token"):
        SPEC.build(TextConfig(**TINY, vocabulary=[1, 2, 3]), None)


def test_a_tower_without_blocks_gives_each_word_features_of_its_own():
    """layers: 0 -- a word's output depends on the word and its position only, not on its neighbours."""
    c = build(layers=0)
    assert len(c.tower.transformer.resblocks) == 0 and not any("resblocks" in k for k in c.state_dict())
    with torch.no_grad():
        red, blue = c.encode(["a red circle", "a blue circle"]).value  # start, a, colour, circle, end
    assert torch.equal(red[3], blue[3]) and not torch.allclose(red[2], blue[2])
    with torch.no_grad():  # one block: "circle" reads its neighbours
        red, blue = build(layers=1).encode(["a red circle", "a blue circle"]).value
    assert not torch.allclose(red[3], blue[3])
    with pytest.raises(ValueError, match="layers"):
        TextConfig(**{**TINY, "layers": -1})


TestTextNeighbourMixConformance = conformance_tests(SPEC, config={**TINY, "layers": 0, "neighbour_mix": 1},
                                                    invalid_inputs=BAD)


def test_neighbour_mix_starts_as_nothing_then_gives_a_word_its_neighbours_only():
    """neighbour_mix: 1 -- zero at the start (a model without it loads unchanged); trained, a word's features
    depend on the words next to it, not on those two places away, and never on padding."""
    plain, mixed = build(layers=0), build(layers=0, neighbour_mix=1)
    assert set(mixed.state_dict()) - set(plain.state_dict()) == {"mix.weight"}
    missing = mixed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["mix.weight"]
    caps = ["a red circle above a blue square", "a red circle above a green square"]
    with torch.no_grad():
        assert torch.equal(mixed.encode(caps).value, plain.encode(caps).value)  # zero-initialized: the same
        torch.nn.init.normal_(mixed.mix.weight, std=0.1)
        blue, green = mixed.encode(caps).value  # start, a, red, circle, above, a, colour(6), square(7), end
    assert not torch.allclose(blue[7], green[7]) and not torch.allclose(blue[5], green[5])  # next to the colour
    assert torch.equal(blue[:5], green[:5]) and torch.equal(blue[8:], green[8:])  # two or more places away
    ids, mask = mixed.prepare(caps)
    garbage = ids.clone()
    garbage[~mask] = 1
    with torch.no_grad():
        assert torch.allclose(mixed((garbage, mask)).value, mixed((ids, mask)).value, atol=1e-6)


def test_neighbour_mix_config_rules():
    with pytest.raises(ValueError, match="causal"):
        TextConfig(**TINY, neighbour_mix=1, causal=True)
    with pytest.raises(ValueError, match="neighbour_mix"):
        TextConfig(**TINY, neighbour_mix=-1)
    assert TextConfig(**TINY, neighbour_mix=2).neighbour_mix == 2
