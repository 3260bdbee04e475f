"""GetModelInfo's answer: the model's config, source and weights, the mesh, the serving plan and the limits."""

from __future__ import annotations

import json

import jax
from meshserve.model.sampling import L_MAX, TOP_LOGPROBS_MAX
from meshserve.protos import inference_pb2 as pb
from meshserve.serving.plan import EnginePlan
from meshserve.serving.validation import Limits

__all__ = ["model_info"]


def model_info(model, plan: EnginePlan, limits: Limits, mesh_info: dict) -> pb.ModelInfo:
    """The ModelInfo message for a loaded model (model/loading.py LoadedModel) served under `plan` with `limits`;
    mesh_info: {"device_kind", "device_count"} (default: this process's first device, one)."""
    c = model.config
    lim = limits
    return pb.ModelInfo(
        model=pb.ModelConfig(
            name=c.name,
            vocab_size=c.vocab_size,
            d_model=c.d_model,
            d_ff=c.d_ff,
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            n_kv_heads=c.real_kv_heads,  # the model's own (a mesh may run each one replicated)
            d_head=c.d_head,
            max_seq_len=c.max_seq_len,
            json=json.dumps(c.to_dict(), sort_keys=True),
        ),
        source=model.source,
        weights=model.weights,
        mesh=pb.Mesh(
            axis_names=list(plan.mesh_axes),
            axis_sizes=list(plan.mesh_axes.values()),
            device_kind=mesh_info.get("device_kind", jax.devices()[0].device_kind),
            device_count=mesh_info.get("device_count", 1),
        ),
        objective=plan.objective,
        plan=[
            pb.PhasePlan(
                phase=s.phase,
                batch=s.batch,
                length=s.length,
                ffn_layout=s.ffn_layout,
                attention_layout=s.attention_layout,
                predicted_ms=s.predicted_ms,
            )
            for s in plan.steps
        ],
        limits=pb.Limits(
            max_context=lim.max_context,
            max_batch=lim.max_batch,
            max_new_tokens=lim.max_new_tokens,
            max_queue=lim.max_queue,
            max_stop_strings=lim.max_stop_strings,
            max_stop_length=lim.max_stop_length,
            max_score_items=lim.max_score_items,
            max_text_chars=lim.text_chars,
            max_score_tokens=lim.max_score_tokens,
            max_top_logprobs=TOP_LOGPROBS_MAX,
            max_n=lim.max_n,
            max_logit_bias=L_MAX,
        ),
        plan_json=plan.to_json(),
        chat_template=getattr(model, "chat", None) is not None,
    )
