"""Backbone registry, construction from flags, and the pretrained-weights hand-off.

- `BACKBONES`: model name -> class (each has `from_args(args, num_items)`, a `display_name`, its own
  `flags` and `check_flags(args)`); `register(cls)` adds one and refuses what cannot work,
  `backbone_flags()` lists every backbone's flags once, `check_flags(args)` runs every backbone's checks.
- `HEADS`: rating head name -> class (models/heads.py, --rating_head); `register_head(cls)` adds one.
- `model_factory(args, num_items)`: the backbone named by `args.model` with the rating head
  `args.rating_head`, initialised from `args.model_init_seed` without touching the caller's random state.
- `export_weights(model)` / `load_pretrained_weights(model, exported, embedding_only, source)`: what
  train_original.py saves and main.py loads (tensors and plain values only, so `torch.load(...,
  weights_only=True)` reads it).
"""
import operator

import torch

from common.errors import MeloError

from .backbones import BERT4Rec, GRU4Rec, NARM, SASRec, Backbone, Flag
from .heads import HEADS, register_head

BACKBONES = {}


def register(backbone):
    """Add a Backbone subclass to the registry under its `name`: --model accepts it, every parser gets its
    flags, its size flags shape checkpoints, and tables name it by its `display_name`.

    What cannot work is refused here with a one-line `MeloError`: not a Backbone, no `name` or
    `display_name`, a name already taken, no `from_args` of its own, or a flag that another backbone
    declares with another type, default or shape role (two backbones may share a flag only as one flag:
    BERT4Rec and SASRec share the transformer's). The parts an instance needs are checked when one is
    built (`check_contract`)."""
    label = getattr(backbone, "__name__", repr(backbone))
    if not (isinstance(backbone, type) and issubclass(backbone, Backbone)):
        raise MeloError(f"cannot register {label}: a backbone must be a subclass of models.Backbone")
    for attribute in ("name", "display_name"):
        if not isinstance(getattr(backbone, attribute), str) or not getattr(backbone, attribute):
            raise MeloError(f"cannot register {label}: it has no {attribute} (a non-empty string, e.g. "
                            f"{attribute} = \"mynet\")")
    if backbone.name in BACKBONES:
        raise MeloError(f"cannot register {label} as {backbone.name!r}: {BACKBONES[backbone.name].__name__} "
                        f"already has that name; choose another name")
    if backbone.from_args.__func__ is Backbone.from_args.__func__:
        raise MeloError(f"cannot register {label}: it does not define from_args(args, num_items)")
    declared = {flag.name: (flag, name) for name, known in BACKBONES.items() for flag in known.flags}
    for flag in backbone.flags:
        if not isinstance(flag, Flag):
            raise MeloError(f"cannot register {label}: its flags must be models.Flag, got {flag!r}")
        other, owner = declared.get(flag.name, (flag, None))
        if other != flag:
            raise MeloError(f"cannot register {label}: its flag --{flag.name} clashes with {owner}'s (another "
                            f"type, default, help or shape role); rename it or declare the same Flag")
    BACKBONES[backbone.name] = backbone
    return backbone


for _backbone in (BERT4Rec, SASRec, GRU4Rec, NARM):
    register(_backbone)


def backbone_flags():
    """[(Flag, names of the backbones that declare it)], each flag once, in registry order (BERT4Rec and
    SASRec share the transformer's)."""
    found = {}
    for name, backbone in BACKBONES.items():
        for flag in backbone.flags:  # register() refused any second declaration that differs
            found.setdefault(flag.name, (flag, []))[1].append(name)
    return list(found.values())


def check_flags(args):
    """The first problem (a one-line message) that a registered backbone finds in the parsed flags, or None.
    Every backbone's checks run, chosen or not, so that compare.py's several --models are checked too."""
    for backbone in BACKBONES.values():
        problem = backbone.check_flags(args)
        if problem:
            return problem
    return None


def check_contract(model, num_items):
    """Refuse, with one line, a built backbone that lacks a part the inner loop and the trainers rely on
    (models/backbones.py's contract): the item table `item_embedding` (an nn.Embedding of num_items + 1 rows,
    row 0 the padding) and the output layer `head` (an nn.Linear with one output: --inner_params=head adapts
    it, the bias head zeroes it)."""
    table, head = getattr(model, "item_embedding", None), getattr(model, "head", None)
    label = type(model).__name__
    if not isinstance(table, torch.nn.Embedding) or table.num_embeddings != num_items + 1 or table.padding_idx != 0:
        raise MeloError(f"backbone {label} breaks the contract: it needs item_embedding = nn.Embedding(num_items + "
                        f"1, dim, padding_idx=0) (models/backbones.py)")
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise MeloError(f"backbone {label} breaks the contract: its output layer must be head = nn.Linear(width, "
                        f"1) (models/backbones.py)")
    return model


def backbone_option_names(shape):
    """The names of the backbones' flags that shape the checkpoint (`shape=True`) or only training."""
    return tuple(flag.name for flag, _ in backbone_flags() if flag.shape == shape)

EXPORT_KEYS = ("item_embedding", "model", "model_name", "num_items")


def model_factory(args, num_items):
    """Build the backbone `args.model` for items 1..num_items (id 0 is padding), with the rating head
    `args.rating_head` (models/heads.py; its data-driven start is the trainer's to set: `set_start`).

    The weights depend only on `args.model_init_seed` (and the sizes): they are drawn on the CPU from a
    freshly seeded default generator inside `fork_rng`, so the caller's CPU random state is restored
    afterwards and CUDA's is never touched. Move the model to its device afterwards.
    """
    name = args.model
    if name not in BACKBONES:
        raise MeloError(f"unknown model {name!r}; known models: {', '.join(BACKBONES)}")
    try:
        num_items = operator.index(num_items)
    except TypeError:
        raise MeloError(f"the number of items must be an integer, got {num_items!r}") from None
    if num_items < 1:
        raise MeloError(f"the data set has no items (num_items={num_items}): nothing to build a model for")
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(args.model_init_seed)
        backbone = check_contract(BACKBONES[name].from_args(args, num_items), num_items)
    if args.rating_head not in HEADS:
        raise MeloError(f"unknown rating head {args.rating_head!r}; known heads: {', '.join(HEADS)}")
    backbone.rating_head = HEADS[args.rating_head].attach(backbone, args.user_factors)
    return backbone


def export_weights(model):
    """The item embedding table and the whole state dict, as CPU tensors, for `torch.save`."""
    return {
        "item_embedding": model.item_embedding.weight.detach().cpu().clone(),
        "model": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        "model_name": model.name,
        "num_items": int(model.num_items),
    }


def _shape(tensor):
    return tuple(tensor.shape)


def load_pretrained_weights(model, exported, embedding_only, source):
    """Copy an `export_weights` dict into `model` in place: the item embedding only, or everything.

    `source` names where the dict came from (a path), for the messages. Anything that does not fit this
    model (another backbone, another data set, other sizes) is a one-line `MeloError`, never a partial load.
    """
    if not isinstance(exported, dict):
        raise MeloError(f"{source} is not a MELO pretrained export (expected a dict, got "
                        f"{type(exported).__name__})")
    missing = [key for key in EXPORT_KEYS if key not in exported]
    if missing:
        raise MeloError(f"{source} is not a MELO pretrained export: it lacks {', '.join(missing)}")
    if exported["model_name"] != model.name:
        raise MeloError(f"pretrained weights in {source} belong to model {exported['model_name']!r} but this "
                        f"model is {model.name!r}: pretrain with --model={model.name} or choose "
                        f"--model={exported['model_name']}")
    table = exported["item_embedding"]
    own_table = model.item_embedding.weight
    if not torch.is_tensor(table):
        raise MeloError(f"pretrained item embedding in {source} is not a tensor")
    if _shape(table) != _shape(own_table):
        raise MeloError(f"pretrained item embedding in {source} has shape {_shape(table)} but this model "
                        f"needs {_shape(own_table)}: it was trained on another data set or with other sizes")
    if embedding_only:
        with torch.no_grad():
            own_table.copy_(table)
        return model

    state = exported["model"]
    own_state = model.state_dict()
    if not isinstance(state, dict):
        raise MeloError(f"pretrained model in {source} is not a state dict")
    unexpected = sorted(set(state) - set(own_state))
    absent = sorted(set(own_state) - set(state))
    if unexpected or absent:
        raise MeloError(f"pretrained model in {source} does not match this {model.name}: "
                        f"missing {absent[:3] or 'nothing'}, unexpected {unexpected[:3] or 'nothing'}")
    for key, own in own_state.items():
        if not torch.is_tensor(state[key]) or _shape(state[key]) != _shape(own):
            found = _shape(state[key]) if torch.is_tensor(state[key]) else type(state[key]).__name__
            raise MeloError(f"pretrained tensor {key} in {source} has shape {found} but this model needs "
                            f"{_shape(own)}: it was trained with other sizes")
    model.load_state_dict(state)
    return model


__all__ = ["BACKBONES", "HEADS", "register_head", "Backbone", "BERT4Rec", "SASRec", "GRU4Rec", "NARM", "Flag",
           "register", "backbone_flags", "backbone_option_names", "check_flags", "check_contract", "model_factory",
           "export_weights", "load_pretrained_weights"]
