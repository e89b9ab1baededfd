"""MAML++'s learned per-layer, per-step inner learning rates (LSLR), as a functional update.

For every adapted parameter tensor `name` there is a vector `lrs[name]` of `num_inner_steps` learning
rates, initialised to `--inner_lr` (or to a rate of its own: `init_lrs`). Inner step k updates a dict of
tensors without touching any module:

    new_params[name] = params[name] - lrs[name][k] * grads[name]

so the same code runs per task, under `torch.func.vmap`, and inside second-order graphs.
"""
import torch
from torch import nn


def _key(name):
    # ParameterDict keys may not contain '.', parameter names do.
    return name.replace(".", "-")


class LSLRGradientDescent(nn.Module):
    def __init__(self, param_names, num_inner_steps, init_lr, learnable=True, init_lrs=None):
        super().__init__()
        self.num_inner_steps = num_inner_steps
        init_lrs = init_lrs or {}
        self.lrs = nn.ParameterDict({
            _key(name): nn.Parameter(torch.full((num_inner_steps,), float(init_lrs.get(name, init_lr))),
                                     requires_grad=learnable)
            for name in param_names
        })

    def learning_rate(self, name, step):
        return self.lrs[_key(name)][step]

    def update(self, params, grads, step):
        """One inner SGD step with the learned rates of `step`; returns a new dict."""
        return {name: value - self.lrs[_key(name)][step] * grads[name] for name, value in params.items()}

    def rates_by_parameter(self):
        """{parameter name: list of per-step rates}, for logging."""
        return {key.replace("-", "."): lr.detach().cpu().tolist() for key, lr in self.lrs.items()}
