"""Sampling settings from the config: the one place `rollout.*` becomes `SamplingParams` (the engine
sizes itself from them, the rollout collector samples with them)."""
from __future__ import annotations


from jaxrl_entropy.models import sampler
from jaxrl_entropy import config as config_lib
from jaxrl_entropy.config import RolloutConfig


def rollout_sampling_params(rollout: RolloutConfig, eos_ids: tuple[int, ...],
                            pad_id: int) -> sampler.SamplingParams:
    rollout = config_lib.section_of(rollout, "rollout", "rollout_sampling_params")
    r = rollout
    return sampler.SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                  top_k=r.top_k, eos_ids=eos_ids, pad_id=pad_id)
