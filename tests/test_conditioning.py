"""The stack: every route and their mixtures, masks, dropout statistics, groups, freezing."""

import pytest
import torch

from ldmkit import ConditionerContext, ConditionInputError, ConditionOutput, ConditioningStack, Route, StackConfig
from ldmkit.conditioning import DropoutGroup
from toys import Level, LevelConfig, MapCond, MapConfig, Words, WordsConfig, batch, make_stack

CTX = ConditionerContext(image_size=32, latent_size=8, latent_channels=4)


def test_wiring_reports_every_route_before_data_flows():
    stack = make_stack(StackConfig(context_dim=16, vector_dim=12), map={"channels": 3})
    w = stack.wiring()
    assert (w.context_dim, w.context_tokens, w.extra_in_channels, w.vector_dim) == (16, 4, 3, 12)


def test_wiring_of_single_routes():
    only_tokens = ConditioningStack([Words(WordsConfig(), CTX)])
    assert only_tokens.wiring().extra_in_channels == 0 and only_tokens.wiring().vector_dim is None
    only_map = ConditioningStack([MapCond(MapConfig(channels=5), CTX)])
    assert only_map.wiring().context_dim is None and only_map.wiring().extra_in_channels == 5


def test_compose_shapes_and_masks():
    stack = make_stack(StackConfig(context_dim=16, vector_dim=12)).eval()
    out = stack(batch(3))
    assert out.context.shape == (3, 4, 16)
    assert out.context_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert out.channels.shape == (3, 2, 8, 8)
    assert out.vector.shape == (3, 12)


def test_tokens_from_several_conditioners_concatenate_along_sequence():
    a = Words(WordsConfig(max_len=2), CTX)
    b = Words(WordsConfig(name="more", key="more", max_len=3, dim=5), CTX)
    stack = ConditioningStack([a, b], StackConfig(context_dim=7)).eval()
    out = stack({"words": [[1], [2, 3]], "more": [[4, 5, 6], [7]]})
    assert out.context.shape == (2, 5, 7)
    assert out.context_mask.tolist() == [[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]]
    # the first two tokens are a's projection only: changing b's input leaves them alone
    out2 = stack({"words": [[1], [2, 3]], "more": [[1], [1]]})
    assert torch.allclose(out.context[:, :2], out2.context[:, :2])
    assert not torch.allclose(out.context[:, 2:], out2.context[:, 2:])


def test_channels_concatenate_and_vectors_sum():
    m1 = MapCond(MapConfig(channels=2), CTX)
    m2 = MapCond(MapConfig(name="m2", key="m2", channels=3), CTX)
    v1 = Level(LevelConfig(), CTX)
    v2 = Level(LevelConfig(name="v2", key="v2"), CTX)
    stack = ConditioningStack([m1, m2, v1, v2], StackConfig(vector_dim=6)).eval()
    data = {"map": [torch.ones(8, 8).tolist()], "m2": [torch.zeros(8, 8).tolist()], "level": [1.0], "v2": [2.0]}
    outs = stack.encode(data)
    comp = stack.compose(outs)
    assert comp.channels.shape == (1, 5, 8, 8)
    assert torch.allclose(comp.channels[:, :2], outs["map"].value)
    expected = stack.vector_proj["level"](outs["level"].value) + stack.vector_proj["v2"](outs["v2"].value)
    assert torch.allclose(comp.vector, expected)


def test_channels_checked_against_latent_size():
    stack = ConditioningStack([MapCond(MapConfig(), CTX)])
    bad = ConditionOutput(Route.CHANNELS, torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"map.*\(1, 2, 4, 4\).*\(1, 2, 8, 8\)"):
        stack.compose({"map": bad})


def test_wrong_route_output_is_rejected():
    stack = ConditioningStack([Level(LevelConfig(), CTX)])
    with pytest.raises(ValueError, match="declared route vector"):
        stack.compose({"level": ConditionOutput(Route.CHANNELS, torch.zeros(1, 6, 8, 8))})


def test_missing_batch_field_names_key_and_accepted():
    stack = make_stack()
    data = batch(2)
    del data["map"]
    with pytest.raises(ConditionInputError, match=r"'map'.*missing.*allowed: level, map, words"):
        stack(data)


def test_bad_input_error_names_field_and_sample():
    stack = make_stack()
    data = batch(2)
    data["words"] = [[1], [99]]
    with pytest.raises(ConditionInputError, match=r"condition 'words' \(sample 1\).*allowed"):
        stack(data)


def test_unconditional_pass_uses_every_null():
    stack = make_stack().eval()
    u = stack.compose(stack.nulls(2))
    w = stack.conditioners["words"]
    assert torch.allclose(u.context[:, 0], stack.token_proj["words"](w.null_token.expand(2, -1)))
    assert u.context_mask[:, 1:].sum() == 0
    assert torch.equal(u.channels, torch.zeros(2, 2, 8, 8))


def test_missing_outputs_are_nulls_and_keep_false_nulls():
    stack = make_stack().eval()
    outs = stack.encode(batch(2))
    partial = stack.compose({"words": outs["words"]})
    full_null_except_words = stack.compose(outs, keep={"map": False, "level": False})
    for f in ("context", "channels", "vector"):
        assert torch.allclose(getattr(partial, f), getattr(full_null_except_words, f))


def test_dropout_statistics_per_conditioner():
    stack = make_stack(words={"dropout": 0.3}, map={"dropout": 0.0}, level={"dropout": 1.0})
    g = torch.Generator().manual_seed(0)
    keep = stack.dropout_keep(20000, g)
    assert abs((~keep["words"]).float().mean().item() - 0.3) < 0.015
    assert keep["map"].all() and (~keep["level"]).all()


def test_dropout_replaces_exactly_the_dropped_samples():
    stack = make_stack(words={"dropout": 0.5}).train()
    data = batch(4)
    outs = stack.encode(data)
    nulls = stack.nulls(4)
    keep = {"words": torch.tensor([True, False, True, False])}
    comp = stack.compose(outs, keep=keep)
    ref_cond = stack.compose(outs, keep={})
    ref_null = stack.compose(nulls)
    assert torch.allclose(comp.context[0], ref_cond.context[0]) and torch.allclose(comp.context[1], ref_null.context[1])
    assert comp.context_mask[1].tolist() == ref_null.context_mask[1].tolist()


def test_joint_dropout_groups_drop_together():
    cfg = StackConfig(dropout_groups=[DropoutGroup(names=["words", "level"], p=0.25)])
    stack = make_stack(cfg, words={"dropout": 0.0}, map={"dropout": 0.0}, level={"dropout": 0.0})
    keep = stack.dropout_keep(20000, torch.Generator().manual_seed(1))
    assert torch.equal(keep["words"], keep["level"])
    assert abs((~keep["words"]).float().mean().item() - 0.25) < 0.015
    assert keep["map"].all()


def test_dropout_groups_must_name_known_conditioners():
    with pytest.raises(ValueError, match=r"unknown conditioner\(s\) nope"):
        make_stack(StackConfig(dropout_groups=[DropoutGroup(names=["words", "nope"], p=0.1)]))


def test_no_dropout_in_eval_mode():
    stack = make_stack(words={"dropout": 1.0}).eval()
    out = stack(batch(2))
    assert out.context_mask[0].tolist() == [True, True, False, False]


def test_frozen_conditioner_never_changes_in_an_optimizer_step():
    stack = make_stack(words={"trainable": False})
    frozen = stack.conditioners["words"]
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    others_before = {k: v.clone() for k, v in stack.conditioners["level"].state_dict().items()}
    stack.train()
    assert not frozen.training and stack.conditioners["level"].training
    params = stack.trainable_parameters()
    assert not {id(p) for p in frozen.parameters()} & {id(p) for p in params}
    opt = torch.optim.Adam(stack.parameters(), lr=0.1)  # even given everything, frozen ones get no grad
    for _ in range(3):
        out = stack.compose(stack.encode(batch(3)), keep={})
        loss = out.context.pow(2).mean() + out.vector.pow(2).mean() + out.channels.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in frozen.state_dict().items():
        assert torch.equal(before[k], v), k
    assert any(not torch.equal(others_before[k], v) for k, v in stack.conditioners["level"].state_dict().items())


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicated: words"):
        ConditioningStack([Words(WordsConfig(), CTX), Words(WordsConfig(), CTX)])


def test_condition_output_validates_itself():
    with pytest.raises(ValueError, match="rank 3"):
        ConditionOutput(Route.TOKENS, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        ConditionOutput(Route.TOKENS, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="only tokens"):
        ConditionOutput(Route.VECTOR, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))


def test_dropout_draws_from_a_cpu_generator_for_a_stack_on_another_device():
    # Training draws every step's randomness from a CPU generator; a GPU stack must accept it
    # (found by the CUDA smoke test, scripts/gpu_smoke.py). The meta device stands in for CUDA here.
    stack = make_stack(words={"dropout": 0.5}).to("meta")
    keep = stack.dropout_keep(8, torch.Generator().manual_seed(0))
    assert keep["words"].device.type == "meta"
