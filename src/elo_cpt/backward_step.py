"""The optimizer step fused into the backward pass (`step_in_backward`), as torchtune's optimizer-in-backward.

Each trained parameter gets its own optimizer, stepped by a hook the moment autograd has finished that parameter's
gradient; the gradient is freed right after. So the gradients of the whole model never exist at once: the peak
holds one layer's gradients instead of all of them, about the trained weights' size less memory.

Trainer drives it like any optimizer: its `step` and `zero_grad` do nothing (the work is done), its learning rate
is the one Trainer's scheduler sets on its parameter groups (each inner optimizer takes its group's rate before it
steps), and its `state_dict` holds every inner optimizer's state, so a checkpoint resumes exactly.

What it cannot do, refused by the config: accumulate gradients over micro-batches (each backward steps), clip by
the global gradient norm (no parameter waits for the others), or run under DDP/FSDP (the hook would step before
the gradients are reduced across processes).
"""

from __future__ import annotations

import torch


class StepInBackward(torch.optim.Optimizer):
    """Trainer's optimizer for `step_in_backward`: `inner` = (optimizer class, its keyword arguments), one instance
    per parameter, built with the parameter's group settings (e.g. weight decay) from `params`."""

    def __init__(self, params, inner: tuple[type[torch.optim.Optimizer], dict]):
        inner_cls, inner_kwargs = inner
        super().__init__(params, {"lr": inner_kwargs.get("lr", 1e-3)})
        self.inner: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        # by index: load_state_dict (Accelerate's device placement, a resume) replaces the group dicts
        self._group_index: dict[torch.nn.Parameter, int] = {}
        for index, group in enumerate(self.param_groups):
            settings = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                self.inner[param] = inner_cls([{**settings, "params": [param]}], **inner_kwargs)
                self._group_index[param] = index
                param.register_post_accumulate_grad_hook(self._step_parameter)

    def _step_parameter(self, param: torch.nn.Parameter) -> None:
        optimizer = self.inner[param]
        optimizer.param_groups[0]["lr"] = self.param_groups[self._group_index[param]]["lr"]  # the rate Trainer's scheduler set this step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing to do: every parameter stepped during the backward pass."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient was freed as soon as its parameter stepped."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["inner"] = [self.inner[p].state_dict() for group in self.param_groups for p in group["params"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        inner = state_dict.pop("inner")
        super().load_state_dict(state_dict)
        for param, saved in zip((p for group in self.param_groups for p in group["params"]), inner, strict=True):
            self.inner[param].load_state_dict(saved)
