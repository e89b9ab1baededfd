"""Backbone contract tests: shapes, padding, causality, functional use, second order, vmap, seeding,
pretrained hand-off. Tiny models on the CPU so the whole file runs in seconds."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

from common import flag_types
from models import (BACKBONES, Backbone, Flag, backbone_flags, check_contract, export_weights, load_pretrained_weights,
                    model_factory, register)
import options
from options import MeloError

NAMES = list(BACKBONES)
CAUSAL = ["sasrec", "gru4rec", "narm"]
NUM_ITEMS = 20
LENGTH = 6


def tiny_args(name, *extra):
    """The backbone contract is the network's (the plain head: 0.1 + sigmoid); the bias head has its own
    tests (test_bias_head.py)."""
    return options.parse_args([
        f"--model={name}", "--rating_head=plain", f"--max_seq_len={LENGTH}", "--bert_hidden_units=8",
        "--bert_num_heads=2", "--bert_num_blocks=2", "--gru4rec_embedding_dim=6", "--gru4rec_hidden_size=8",
        "--gru4rec_n_layers=2", "--narm_embedding_dim=6", "--narm_hidden_size=8", *extra,
    ])


def build(name, *extra, dtype=torch.float32, train=False, num_items=NUM_ITEMS):
    """A tiny model; eval mode unless `train` (dropout off for exact comparisons)."""
    model = model_factory(tiny_args(name, *extra), num_items).to(dtype)
    return model.train(train)


def windows(batch=4, seed=0):
    """Left-padded windows of real lengths 6, 4, 2, 1, ... with ids in 1..NUM_ITEMS."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_ITEMS + 1, (batch, LENGTH), generator=generator)
    lengths = torch.tensor([6, 4, 2, 1] * batch)[:batch]
    return torch.where(torch.arange(LENGTH) >= LENGTH - lengths[:, None], ids, 0)


def targets_like(ids, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ratings = torch.randint(1, 6, ids.shape, generator=generator) / 5.0
    return ratings, (ids > 0)


def masked_mse(params, model, ids, ratings, mask):
    """The mean squared error over real positions of `model` run with `params` (parameters first, so
    `torch.func.grad` differentiates them)."""
    predictions = functional_call(model, params, (ids,))
    mask = mask.to(predictions.dtype)
    return ((predictions - ratings.to(predictions.dtype)) ** 2 * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------- basics

def test_registry_matches_options_and_unknown_model_is_a_melo_error():
    model_flag = next(a for a in options.build_parser()._actions if a.dest == "model")
    assert tuple(model_flag.choices) == tuple(BACKBONES) == ("bert4rec", "sasrec", "gru4rec", "narm")
    args = tiny_args("bert4rec")
    args.model = "transformer-xl"
    with pytest.raises(MeloError, match="known models: bert4rec, sasrec, gru4rec, narm"):
        model_factory(args, NUM_ITEMS)
    with pytest.raises(MeloError):
        model_factory(tiny_args("bert4rec"), 0)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_range(name):
    ids = windows()
    for train in (True, False):
        model = build(name, "--bert_dropout=0.3", train=train)
        assert isinstance(model.item_embedding, torch.nn.Embedding)
        assert model.item_embedding.weight.shape[0] == NUM_ITEMS + 1 and model.item_embedding.padding_idx == 0
        out = model(ids)
        assert out.shape == ids.shape and out.dtype == torch.float32
        assert (out > 0.1).all() and (out < 1.1).all()
    # Mixed precision (as on a GPU): the masking constant and the dtypes must still work out.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build(name, train=True)(torch.cat([ids, torch.zeros_like(ids[:1])]))
    assert out.shape == (ids.shape[0] + 1, LENGTH) and torch.isfinite(out).all()


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales():
    from models.layers import Dropout

    torch.manual_seed(0)
    dropout = Dropout(0.25).train()
    x = torch.ones(400, 500)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert torch.equal(dropout.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    # under vmap (randomness="different") every task draws its own mask; gradients are the mask
    masks = vmap(lambda row: Dropout(0.5).train()(row), randomness="different")(torch.ones(8, 1000))
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == 8
    w = torch.ones(1000, requires_grad=True)
    out = Dropout(0.5).train()(w)
    out.sum().backward()
    torch.testing.assert_close(w.grad, out.detach())
    # Four elements share a 64-bit draw (16 bits each): any width works, every quarter keeps 1 - p of
    # its elements, independently of the others, and the scale is exact for p rounded to a multiple of 2^-16.
    for width in (1, 6):
        y = Dropout(0.5).train()(torch.ones(40000, width))
        assert y.shape == (40000, width) and abs((y != 0).float().mean().item() - 0.5) < 0.01
    y = Dropout(0.5).train()(torch.ones(40000, 4)) != 0
    assert ((y.float().mean(0) - 0.5).abs() < 0.01).all()
    for i, j in [(0, 1), (1, 2), (2, 3)]:
        assert abs((y[:, i] & y[:, j]).float().mean().item() - 0.25) < 0.01
    y = Dropout(0.1).train()(torch.ones(10))
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 65536 / (65536 - 6554)))


def test_dropout_masks_are_the_same_where_vmap_cannot_view_int64_as_int16(monkeypatch):
    """torch 2.11's vmap has no rule for `view(dtype)`: the shift-and-mask path gives the same masks."""
    from models import layers

    bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (5, 3), dtype=torch.int64)
    viewed = bits.view(torch.int16)[..., :11]
    monkeypatch.setattr(layers, "DTYPE_VIEW_BATCHES", False)
    assert torch.equal(layers.sixteen_bit_quarters(bits, 11), viewed)

    def masks(tasks):
        torch.manual_seed(3)
        return vmap(lambda row: layers.Dropout(0.3).train()(row), randomness="different")(tasks)

    tasks = torch.ones(4, 7, 10)
    shifted = masks(tasks)
    monkeypatch.setattr(layers, "DTYPE_VIEW_BATCHES", True)
    if layers.dtype_view_batches():  # this torch can check the other path against it
        assert torch.equal(masks(tasks), shifted)
    assert 0.6 < (shifted != 0).float().mean().item() < 0.8


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_gru_equals_a_plain_layer_by_layer_loop(num_layers):
    """The wavefront (several layers) and the single-layer loop against the equations, step by step."""
    from models.layers import GRU

    torch.manual_seed(0)
    gru = GRU(6, 8, num_layers).double()
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    real = torch.arange(7) >= torch.tensor([0, 2, 5, 6, 7])[:, None]  # left padding, one all-padding row

    def reference(x):
        for input_proj, hidden_proj in zip(gru.input_proj, gru.hidden_proj):
            h, states = torch.zeros(x.shape[0], 8, dtype=x.dtype), []
            for t in range(x.shape[1]):
                i_r, i_u, i_n = input_proj(x[:, t]).chunk(3, dim=-1)
                h_r, h_u, h_n = hidden_proj(h).chunk(3, dim=-1)
                r, u = torch.sigmoid(i_r + h_r), torch.sigmoid(i_u + h_u)
                n = torch.tanh(i_n + r * h_n)
                h = torch.where(real[:, t, None], h + u * (n - h), h)
                states.append(h)
            x = torch.stack(states, dim=1)
        return x

    expected, found = reference(x), gru(x, real)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(found[~real], torch.zeros_like(found[~real]))  # padding holds the zero state exactly
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((found * weights).sum(), list(gru.parameters()))
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(gru.parameters()))
    for grad_found, grad_expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad_found, grad_expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("widening", [False, True])
def test_layer_norm_folded_into_the_next_linear_layer_is_that_layer_after_the_norm(widening):
    """LayerNorm.project: the affine part folded into the linear layer's weight and bias gives
    linear(norm(x)) against the layer-norm equation, with the same first and second derivatives."""
    from models.layers import LayerNorm, Linear, WideningLinear

    torch.manual_seed(0)
    norm = LayerNorm(6).double()
    linear = (WideningLinear(6, 12) if widening else Linear(6, 3)).double()
    with torch.no_grad():  # a non-identity affine part, or the fold would be trivially right
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    parameters = [x, *norm.parameters(), *linear.parameters()]

    def reference(x):
        centred = x - x.mean(-1, keepdim=True)
        normalised = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        return (normalised * norm.weight + norm.bias) @ linear.weight.t() + linear.bias

    found, expected = norm.project(x, linear), reference(x)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((found * weights).sum(), parameters, create_graph=True)
    expected_grads = torch.autograd.grad((expected * weights).sum(), parameters, create_graph=True)
    for grad_found, grad_expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad_found, grad_expected, rtol=1e-10, atol=1e-12)
    # second order: the gradient of a function of the first gradients
    second = torch.autograd.grad(sum((g * g).sum() for g in grads), parameters, materialize_grads=True)
    expected_second = torch.autograd.grad(sum((g * g).sum() for g in expected_grads), parameters,
                                          materialize_grads=True)
    for grad_found, grad_expected in zip(second, expected_second):
        torch.testing.assert_close(grad_found, grad_expected, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------- padding

@pytest.mark.parametrize("name", NAMES)
def test_padding_row_does_not_reach_real_positions(name):
    model = build(name)
    ids = windows()
    real = ids > 0
    before = model(ids)
    with torch.no_grad():
        model.item_embedding.weight[0] += 3.0 * torch.randn(model.item_embedding.weight.shape[1])
    after = model(ids)
    torch.testing.assert_close(after[real], before[real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_amount_of_left_padding_does_not_matter(name):
    # The same 3 real items padded to length 6 and to length 4: same outputs at the real positions.
    model = build(name)
    items = torch.tensor([[5, 9, 2]])
    long_window = torch.cat([torch.zeros(1, 3, dtype=torch.long), items], dim=1)
    short_window = torch.cat([torch.zeros(1, 1, dtype=torch.long), items], dim=1)
    torch.testing.assert_close(model(long_window)[:, -3:], model(short_window)[:, -3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_all_padding_window_is_finite_with_finite_gradients(name):
    model = build(name, "--bert_dropout=0.2", train=True)
    ids = torch.cat([windows(2), torch.zeros(2, LENGTH, dtype=torch.long)])
    out = model(ids)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), key


# ------------------------------------------------------------------------------------------- causality

@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    model = build(name)
    ids = windows(2)  # rows with 6 and 4 real items
    changed = ids.clone()
    t = 3
    changed[:, t] = torch.where(ids[:, t] == 7, 8, 7)
    before, after = model(ids), model(changed)
    assert not torch.allclose(before[:, t], after[:, t])  # the changed position itself moves
    if name in CAUSAL:
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    else:  # bert4rec is bidirectional: the earlier real positions see the change
        assert not torch.allclose(before[0, :t], after[0, :t])


# ------------------------------------------------------------------------------------------- functional use

@pytest.mark.parametrize("name", NAMES)
def test_functional_call_with_own_parameters(name):
    model = build(name)
    ids = windows()
    params = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, params, (ids,)), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_reduced_item_table_gives_the_same_output(name):
    # What the inner loop does: keep only the rows a task uses (row 0 first), remap the ids.
    model = build(name)
    ids = windows()
    used = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), ids.flatten()]))  # sorted, 0 first
    remapped = torch.searchsorted(used, ids)
    params = dict(model.named_parameters())
    params["item_embedding.weight"] = params["item_embedding.weight"][used]
    assert params["item_embedding.weight"].shape[0] < NUM_ITEMS + 1
    torch.testing.assert_close(functional_call(model, params, (remapped,)), model(ids), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- second order

def adapted_query_loss(model, params, support, query, lr, steps, inner_grad):
    """Query loss after `steps` functional SGD steps on the support loss, keeping the inner graph."""
    for _ in range(steps):
        if inner_grad == "func":
            grads = grad(masked_mse)(params, model, *support)
        else:
            loss = masked_mse(params, model, *support)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
        params = {key: params[key] - lr * grads[key] for key in params}
    return masked_mse(params, model, *query)


@pytest.mark.parametrize("name", NAMES)
def test_second_order_gradient_matches_finite_differences(name):
    torch.manual_seed(0)
    model = build(name, dtype=torch.float64)
    support = (windows(4, seed=2), *targets_like(windows(4, seed=2), seed=3))
    query = (windows(2, seed=4), *targets_like(windows(2, seed=4), seed=5))
    base = {key: value.detach().clone().requires_grad_() for key, value in model.named_parameters()}
    lr, steps = 0.5, 2

    analytic = {}
    for inner_grad in ("func", "autograd"):
        meta = adapted_query_loss(model, base, support, query, lr, steps, inner_grad)
        analytic[inner_grad] = dict(zip(base, torch.autograd.grad(meta, list(base.values()))))
    for key in base:
        torch.testing.assert_close(analytic["func"][key], analytic["autograd"][key])
        assert torch.isfinite(analytic["func"][key]).all(), key

    # The second-order part (full minus first-order, i.e. inner gradients treated as constants) is non-zero.
    first_order_params = dict(base)
    for _ in range(steps):
        grads = grad(masked_mse)({k: v.detach() for k, v in first_order_params.items()}, model, *support)
        first_order_params = {k: first_order_params[k] - lr * grads[k] for k in base}
    first = torch.autograd.grad(masked_mse(first_order_params, model, *query), list(base.values()))
    second_order_norm = sum((analytic["func"][k] - f).norm() ** 2 for k, f in zip(base, first)).sqrt()
    assert second_order_norm > 1e-6

    # Central differences on the largest coordinate of a few parameter tensors, the item table included.
    def meta_loss_at(key, index, delta):
        with torch.no_grad():
            shifted = {k: v.detach().clone() for k, v in base.items()}
            shifted[key][index] += delta
        return adapted_query_loss(model, shifted, support, query, lr, steps, "func").item()

    keys = ["item_embedding.weight", "head.weight", list(base)[1], list(base)[-3]]
    eps = 1e-6
    for key in keys:
        index = tuple(torch.nonzero(analytic["func"][key].abs() == analytic["func"][key].abs().max())[0].tolist())
        numeric = (meta_loss_at(key, index, eps) - meta_loss_at(key, index, -eps)) / (2 * eps)
        exact = analytic["func"][key][index].item()
        assert exact != 0.0, key
        assert abs(numeric - exact) <= 1e-6 * max(1.0, abs(exact)), (key, index, numeric, exact)


# ------------------------------------------------------------------------------------------- vmap over tasks

@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_tasks_matches_the_per_task_loop(name):
    # float64 and tight tolerances: a fused op whose double backward is wrong under vmap (the affine
    # nn.LayerNorm was ~0.5% off) must fail here, not hide in float32 noise.
    model = build(name, dtype=torch.float64)
    tasks = 3
    generator = torch.Generator().manual_seed(7)
    base = {key: value.detach().clone().requires_grad_() for key, value in model.named_parameters()}
    noise = {key: 0.05 * torch.randn((tasks, *value.shape), generator=generator, dtype=torch.float64)
             for key, value in base.items()}
    ids = torch.stack([windows(4, seed=10 + task) for task in range(tasks)])  # [T, B, L]
    ratings, mask = targets_like(ids, seed=11)

    def task_loss(params, task_ids, task_ratings, task_mask):
        for _ in range(2):
            grads = grad(masked_mse)(params, model, task_ids, task_ratings, task_mask)
            params = {key: params[key] - 0.3 * grads[key] for key in params}
        return masked_mse(params, model, task_ids, task_ratings, task_mask)

    def check(batched, looped):
        torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
        batched_grads = torch.autograd.grad(batched.sum(), list(base.values()))
        looped_grads = torch.autograd.grad(looped.sum(), list(base.values()))
        for key, b, lg in zip(base, batched_grads, looped_grads):
            torch.testing.assert_close(b, lg, rtol=1e-8, atol=1e-11, msg=key)

    # Per-task parameter dicts, stacked.
    stacked = {key: base[key] + noise[key] for key in base}
    check(vmap(task_loss, randomness="different")(stacked, ids, ratings, mask),
          torch.stack([task_loss({key: base[key] + noise[key][task] for key in base},
                                 ids[task], ratings[task], mask[task]) for task in range(tasks)]))

    # The inner loop's layout: shared parameters unbatched, only the item table per task.
    table_key = "item_embedding.weight"
    shared = {key: value for key, value in base.items() if key != table_key}
    tables = base[table_key] + noise[table_key]

    def shared_task_loss(table, task_ids, task_ratings, task_mask):
        return task_loss({**shared, table_key: table}, task_ids, task_ratings, task_mask)

    check(vmap(shared_task_loss, randomness="different")(tables, ids, ratings, mask),
          torch.stack([shared_task_loss(tables[task], ids[task], ratings[task], mask[task])
                       for task in range(tasks)]))

    # With dropout on, vmap needs randomness="different" and must still give finite losses and grads.
    model_with_dropout = build(name, "--bert_dropout=0.2", train=True)
    dropout_params = {key: value.detach().requires_grad_() for key, value in model_with_dropout.named_parameters()}

    def dropout_task_loss(params, task_ids, task_ratings, task_mask):
        grads = grad(masked_mse)(params, model_with_dropout, task_ids, task_ratings, task_mask)
        params = {key: params[key] - 0.3 * grads[key] for key in params}
        return masked_mse(params, model_with_dropout, task_ids, task_ratings, task_mask)

    losses = vmap(dropout_task_loss, in_dims=(None, 0, 0, 0), randomness="different")(dropout_params, ids,
                                                                                     ratings, mask)
    outer = torch.autograd.grad(losses.sum(), list(dropout_params.values()))
    assert torch.isfinite(losses).all() and all(torch.isfinite(g).all() for g in outer)


# ------------------------------------------------------------------------------------------- seeding

@pytest.mark.parametrize("name", NAMES)
def test_model_init_seed(name):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = build(name, "--model_init_seed=5").state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    same = build(name, "--model_init_seed=5").state_dict()
    other = build(name, "--model_init_seed=6").state_dict()
    assert all(torch.equal(first[key], same[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)
    assert torch.equal(torch.get_rng_state(), rng_before)


# ------------------------------------------------------------------------------------------- pretrained hand-off

@pytest.mark.parametrize("name", NAMES)
def test_export_and_load_round_trip(name, tmp_path):
    source_model = build(name, "--model_init_seed=1")
    path = tmp_path / "pretrained.pt"
    torch.save(export_weights(source_model), path)
    exported = torch.load(path, weights_only=True)
    assert exported["model_name"] == name and exported["num_items"] == NUM_ITEMS
    assert torch.equal(exported["item_embedding"], source_model.item_embedding.weight)

    target = build(name, "--model_init_seed=2")
    untouched = {key: value.clone() for key, value in target.state_dict().items()}
    load_pretrained_weights(target, exported, embedding_only=True, source=str(path))
    for key, value in target.state_dict().items():
        expected = source_model.state_dict()[key] if key == "item_embedding.weight" else untouched[key]
        assert torch.equal(value, expected), key

    target = build(name, "--model_init_seed=2")
    load_pretrained_weights(target, exported, embedding_only=False, source=str(path))
    for key, value in target.state_dict().items():
        assert torch.equal(value, source_model.state_dict()[key]), key
    ids = windows()
    torch.testing.assert_close(target(ids), source_model(ids), rtol=0, atol=0)


def test_load_rejects_what_does_not_fit():
    exported = export_weights(build("bert4rec", num_items=30))
    with pytest.raises(MeloError) as error:
        load_pretrained_weights(build("bert4rec"), exported, embedding_only=True, source="p.pt")
    assert str(error.value) == ("pretrained item embedding in p.pt has shape (31, 8) but this model needs "
                                "(21, 8): it was trained on another data set or with other sizes")
    for embedding_only in (True, False):
        with pytest.raises(MeloError, match="'bert4rec'.*'sasrec'"):
            load_pretrained_weights(build("sasrec", num_items=30), exported, embedding_only, source="p.pt")
    # Same table, other sizes elsewhere: only the whole-model load notices.
    other_depth = build("bert4rec", "--bert_num_blocks=1", num_items=30)
    load_pretrained_weights(other_depth, exported, embedding_only=True, source="p.pt")
    with pytest.raises(MeloError, match="does not match"):
        load_pretrained_weights(other_depth, exported, embedding_only=False, source="p.pt")
    wider_ff = dict(exported, model=dict(exported["model"]))
    wider_ff["model"]["head.weight"] = torch.zeros(1, 9)
    with pytest.raises(MeloError, match=r"head.weight in p.pt has shape \(1, 9\)"):
        load_pretrained_weights(build("bert4rec", num_items=30), wider_ff, embedding_only=False, source="p.pt")
    with pytest.raises(MeloError, match="not a MELO pretrained export"):
        load_pretrained_weights(build("bert4rec"), {"model": {}}, embedding_only=False, source="p.pt")


# ------------------------------------------------------------------------------------------- a fifth backbone
class BagOfItems(Backbone):
    """A throwaway fifth backbone: each position's rating from the mean embedding of the window so far."""

    name, display_name = "bag", "Bag of items"
    flags = (Flag("bag_embedding_dim", flag_types.positive_int, 8, "item embedding size"),)

    def __init__(self, num_items, embedding_dim=8):
        super().__init__(num_items)
        self.item_embedding = torch.nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        self.head = torch.nn.Linear(embedding_dim, 1)

    @classmethod
    def from_args(cls, args, num_items):
        return cls(num_items, args.bag_embedding_dim)

    def forward(self, item_ids):
        real = (item_ids > 0).unsqueeze(-1).to(self.item_embedding.weight.dtype)
        so_far = (self.item_embedding(item_ids) * real).cumsum(1) / real.cumsum(1).clamp_min(1)
        return self.rating_output(self.head(so_far).squeeze(-1), item_ids)


@pytest.fixture
def registry():
    """The backbone registry, restored after the test whatever it registered."""
    saved = dict(BACKBONES)
    yield BACKBONES
    BACKBONES.clear()
    BACKBONES.update(saved)


def test_a_fifth_backbone_is_its_class_and_its_registry_entry(tmp_path, registry):
    """Registered, the class alone makes --model=bag and --bag_embedding_dim work in every script, shapes
    checkpoints by its size flag and names its table rows; no other source file knows it."""
    import main
    from training import runs
    import train_original
    from ratings.synthetic import write_movielens

    register(BagOfItems)
    write_movielens(str(tmp_path / "u.data"), fmt="ml-100k", num_users=60, num_items=40, seed=1)
    argv = ["--mode=ml-100k", f"--data_path={tmp_path}/u.data", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=10", "--val_size=5", "--batch_size=4", "--num_samples=4", "--num_query_set=2",
            "--max_seq_len=8", "--num_train_iterations=2", "--log_interval=2", "--pretrain_epochs=1",
            "--num_threads=1", f"--checkpoint_dir={tmp_path}/ckpt", f"--log_dir={tmp_path}/runs",
            f"--pretrain_log_dir={tmp_path}/pre", "--model=bag", "--bag_embedding_dim=6", "--rating_head=bias"]
    main.main(options.parse_args(argv))
    report = main.main(options.parse_args(argv + ["--checkpoint_step=2", "--test"]))
    train_original.main(options.parse_args(argv))
    basic = train_original.main(options.parse_args(argv + ["--checkpoint_step=1", "--test"]))
    assert 0 < report["rmse"] < 5 and 0 < basic["rmse"] < 5 and report["model"] == basic["model"] == "bag"
    assert "bag_embedding_dim" in runs.shape_option_names()
    with pytest.raises(MeloError, match=r"bag_embedding_dim=6 \(now 4\)"):
        main.main(options.parse_args(argv + ["--bag_embedding_dim=4", "--checkpoint_step=2", "--test"]))
    from studies import tables
    assert tables.display("bag") == "Bag of items"


def variant(base=BagOfItems, **attributes):
    """A subclass of `base` with the given class attributes (a throwaway backbone for the registry tests)."""
    return type(attributes.pop("class_name", "Variant"), (base,), attributes)


def test_the_registry_refuses_what_cannot_work_with_one_line(registry):
    """A taken name, a missing name or from_args, a flag declared twice in two ways, or not a Backbone:
    each refused at registration, and the registry is left as it was."""
    before = dict(registry)
    cases = [
        (variant(name="gru4rec"), "GRU4Rec already has that name"),
        (variant(name=None), "it has no name"),
        (variant(name="bag2", display_name=""), "it has no display_name"),
        (type("NoBuilder", (Backbone,), {"name": "nb", "display_name": "NB"}), "does not define from_args"),
        (variant(name="bag3", flags=(Flag("gru4rec_n_layers", flag_types.depth, 3, "GRU layers"),)),
         "--gru4rec_n_layers clashes with gru4rec's"),
        (variant(name="bag4", flags=("bag_width",)), "its flags must be models.Flag"),
        (torch.nn.Linear, "a subclass of models.Backbone"),
    ]
    for backbone, message in cases:
        with pytest.raises(MeloError, match=message) as caught:
            register(backbone)
        assert "\n" not in str(caught.value)
    assert registry == before
    # the same flag declared the same way is one flag, shared (as BERT4Rec and SASRec share theirs)
    shared = variant(name="bag5", display_name="Bag 5", flags=BagOfItems.flags + (BACKBONES["gru4rec"].flags[2],))
    register(shared)
    assert [names for flag, names in backbone_flags() if flag.name == "gru4rec_n_layers"] == [["gru4rec", "bag5"]]


def test_a_built_backbone_without_the_item_table_or_the_output_layer_is_refused():
    """--inner_params=head adapts the layer named `head` and the inner loop swaps `item_embedding`'s rows: a
    backbone that names them otherwise, or shapes them otherwise, is refused when it is built."""
    good = BagOfItems(NUM_ITEMS)
    assert check_contract(good, NUM_ITEMS) is good

    def renamed_head(self, num_items, embedding_dim=8):
        BagOfItems.__init__(self, num_items, embedding_dim)
        self.output = self.head
        del self.head

    def wide_head(self, num_items, embedding_dim=8):
        BagOfItems.__init__(self, num_items, embedding_dim)
        self.head = torch.nn.Linear(embedding_dim, 2)

    def no_padding_row(self, num_items, embedding_dim=8):
        BagOfItems.__init__(self, num_items, embedding_dim)
        self.item_embedding = torch.nn.Embedding(num_items + 1, embedding_dim)

    for init, message in ((renamed_head, "head = nn.Linear"), (wide_head, "head = nn.Linear"),
                          (no_padding_row, "item_embedding = nn.Embedding")):
        with pytest.raises(MeloError, match=message):
            check_contract(variant(__init__=init)(NUM_ITEMS), NUM_ITEMS)
    with pytest.raises(MeloError, match="item_embedding"):
        check_contract(good, NUM_ITEMS + 1)  # a table of another data set's size


def test_a_backbone_checks_its_own_flags_and_options_reports_them():
    """BERT4Rec's and SASRec's head-count check lives with the transformer; options.validate shows it as a
    flag error (exit 2) whatever --model is, so compare.py's several models are covered."""
    args = options.parse_args(["--model=gru4rec"])
    assert BACKBONES["bert4rec"].check_flags(args) is None and BACKBONES["gru4rec"].check_flags(args) is None
    args.bert_hidden_units, args.bert_num_heads = 30, 4
    assert "must be divisible by --bert_num_heads (4)" in BACKBONES["sasrec"].check_flags(args)
    assert BACKBONES["gru4rec"].check_flags(args) is None
    with pytest.raises(SystemExit) as exited:
        options.parse_args(["--model=gru4rec", "--bert_hidden_units=30", "--bert_num_heads=4"])
    assert exited.value.code == 2
