"""LightSeq's rematerialization-aware checkpointing, alone and wired into the training forward (mrsp.sp_logprobs).

With --activation_checkpointing=1 every decoder layer is recomputed in backward; under sequence parallelism the
recompute must reuse the ring attention output kept by the forward (no second ring forward: P-1 K/V transfers and
the kernels), run the SP attention the forward ran (the recompute happens inside loss.backward(), after
sp_attention has exited), give the gradients of the run without checkpointing, and keep nothing once the graph is
gone (no-grad prefills keep nothing; a forward without its backward must not leak into the next one).

    python -m pytest -q tests/test_remat.py        # single process + CPU gloo, 2 processes, the tiny checkpoint
"""
import gc
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import seq_parallel_attn as spa
from dist_utils import run_distributed

TOL = 1e-5


def _live():
    """(slots alive, outputs kept) once unreachable graphs are collected."""
    gc.collect()
    return len(spa._SLOTS), spa.remat_kept()


# ----------------------------------------------------------------------------------------------------------
# the mechanism, one process (ring_attn with P=1 runs the same autograd.Function and remat path)

def _layers(x, ws, context_fn, keys=None):
    """Residual attention layers, each checkpointed (context_fn: None = plain checkpointing, no checkpoint if False)."""
    h = x
    for i, w in enumerate(ws):
        def layer(h, w=w, key=(keys[i] if keys else i)):
            q, k, v = (h @ w).view(1, h.shape[1], 3, 2, 4).unbind(2)            # (B, S, H, D) each
            return h + spa.ring_attn(q, k, v, remat_key=key).flatten(2)
        if context_fn is False:
            h = layer(h)
        else:
            kw = {} if context_fn is None else dict(context_fn=context_fn)
            h = checkpoint(layer, h, use_reentrant=False, **kw)
    return h


def _weights(n=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 8, generator=g)
    return x, [(torch.randn(8, 24, generator=g) / 3).requires_grad_() for _ in range(n)]


def _grads(ws):
    out = [w.grad.clone() for w in ws]
    for w in ws:
        w.grad = None
    return out


def test_remat_contexts_run_each_ring_forward_once():
    x, ws = _weights()
    res = {}
    for mode, fn in (("plain", False), ("ckpt", None), ("remat", spa.remat_contexts)):
        spa.reset_stats()
        y = _layers(x, ws, fn)
        kept_after_forward = spa.remat_kept()
        y.square().sum().backward()
        res[mode] = (dict(spa.STATS), kept_after_forward, _grads(ws))
    assert res["plain"][0]["ring_fwd"] == 3 and res["ckpt"][0]["ring_fwd"] == 6        # checkpoint alone: 2x
    assert res["remat"][0]["ring_fwd"] == 3 and res["remat"][0]["remat_hits"] == 3
    assert res["remat"][1] == 3 and res["ckpt"][1] == 0                                # kept: one per layer
    for mode in ("ckpt", "remat"):
        assert all(torch.equal(a, b) for a, b in zip(res[mode][2], res["plain"][2])), mode
    assert _live() == (0, 0)                                                           # graphs gone: nothing left


def test_remat_keeps_nothing_without_a_backward_to_come():
    x, ws = _weights()
    with torch.no_grad():                                   # a prefill: checkpoint runs, no backward will come
        _layers(x, ws, spa.remat_contexts)
    assert spa.remat_kept() == 0
    frozen = [w.detach() for w in ws]                       # grad enabled but nothing requires grad
    _layers(x, frozen, spa.remat_contexts)
    assert spa.remat_kept() == 0


def test_abandoned_forward_does_not_leak_or_poison_the_next():
    x, ws = _weights()
    spa.reset_stats()
    y = _layers(x, ws, spa.remat_contexts)
    assert spa.remat_kept() == 3
    del y                                                   # e.g. an exception between forward and backward
    assert _live() == (0, 0)
    with torch.no_grad():
        for w in ws:
            w.mul_(1.5)                                     # other weights next: a stale output would show
    _layers(x, ws, False).square().sum().backward()
    want = _grads(ws)
    spa.reset_stats()
    _layers(x, ws, spa.remat_contexts).square().sum().backward()
    assert spa.STATS["remat_hits"] == 3 and spa.STATS["ring_fwd"] == 3
    assert all(torch.equal(a, b) for a, b in zip(_grads(ws), want))


def test_second_backward_through_a_retained_graph_reruns_the_ring():
    x, ws = _weights(2)
    _layers(x, ws, False).square().sum().backward()
    want = _grads(ws)
    spa.reset_stats()
    y = _layers(x, ws, spa.remat_contexts).square().sum()
    y.backward(retain_graph=True)
    y.backward()                                            # the kept outputs were consumed: the ring runs again
    assert spa.STATS["remat_hits"] == 2 and spa.STATS["ring_fwd"] == 4
    assert all(torch.allclose(a, 2 * b, atol=TOL) for a, b in zip(_grads(ws), want))


def test_remat_errors_instead_of_wrong_gradients():
    x, ws = _weights(2)
    with pytest.raises(ValueError, match="remat_key=7 used twice"):         # two layers, one key, one checkpoint
        checkpoint(lambda h: _layers(h, ws, False, keys=[7, 7]), x.requires_grad_(), use_reentrant=False,
                   context_fn=spa.remat_contexts)

    def inplace(h):
        q = (h @ ws[0]).view(1, 7, 3, 2, 4)[:, :, 0]
        out = spa.ring_attn(q, q, q, remat_key=0)
        return out.mul_(2).flatten(2)                       # modifies the output the forward kept
    y = checkpoint(inplace, x, use_reentrant=False, context_fn=spa.remat_contexts)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


# ----------------------------------------------------------------------------------------------------------
# wired into training: mrsp.prepare_model(activation_checkpointing=True) + sp_logprobs, SP=2, FSDP2, gloo

def _seq(ckpt, synth_dir, i=0, frames=8):
    """One SFT sequence (cached video embeddings + prompt + target), as sft.py builds it."""
    from data import encode_text, load_records
    from mrsp import get_video_embeds, load_model
    model, processor = load_model(ckpt)
    rec = load_records(os.path.join(synth_dir, "val.jsonl"))[i]
    (v,), _ = get_video_embeds(model, processor, [rec], None, num_frames=frames)
    t = encode_text(processor, rec, v["video_grid_thw"], with_target=True)
    return dict(input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"], embeds=v["embeds"],
                video_grid_thw=v["video_grid_thw"], second_per_grid_ts=v["second_per_grid_ts"],
                loss_mask=t["labels"] != -100)


def _model(ckpt, mesh, checkpointing):
    from mrsp import load_model, prepare_model
    model, _ = load_model(ckpt)
    model.train()   # HF checkpoints a layer only in train mode (sft.py / rl.py call policy.train())
    return prepare_model(model, mesh, freeze_vision=True, activation_checkpointing=checkpointing)


def _step(model, seq, mesh, impl="ring"):
    """sft.py's pattern: one sp_logprobs forward, its backward right after. -> what the ring did, what was kept
    after the forward and after the backward, and the full (summed over ranks) gradients."""
    from mrsp import sp_logprobs
    spa.reset_stats()
    lp = sp_logprobs(model, seq, group=mesh.sp_group, impl=impl)
    fwd, kept = spa.STATS["ring_fwd"], spa.remat_kept()
    (-(lp.sum() / seq["loss_mask"].sum())).backward()
    del lp
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return dict(fwd_in_forward=fwd, kept_after_forward=kept, stats=dict(spa.STATS), live_after=_live(),
                grads=grads)


def _train_worker(ckpt, seqs):
    from mrsp import setup_mesh, sp_logprobs
    mesh = setup_mesh(2)
    out = dict(layers=None)
    plain = _model(ckpt, mesh, False)
    out["layers"] = plain.config.text_config.num_hidden_layers
    out["plain"] = [_step(plain, s, mesh) for s in seqs]
    out["plain_ulysses"] = _step(plain, seqs[0], mesh, "ulysses")
    del plain
    model = _model(ckpt, mesh, True)
    # 1) the training pattern over several sequences: every step reuses, nothing accumulates
    out["remat"] = [_step(model, s, mesh) for s in seqs]
    # 2) a no-grad prefill on the train-mode model (rl.py's old/ref log-probs): nothing is kept
    spa.reset_stats()
    with torch.no_grad():
        sp_logprobs(model, seqs[0], group=mesh.sp_group)
    out["prefill"] = dict(stats=dict(spa.STATS), live=_live())
    # 3) an exception between the layers' forward and the backward (here: in the LM head): nothing leaks, and the
    #    next sequence (a different one) gets its own outputs, not this one's
    model.lm_head.forward = lambda h: (_ for _ in ()).throw(RuntimeError("simulated failure in the LM head"))
    try:
        sp_logprobs(model, seqs[0], group=mesh.sp_group)
    except RuntimeError as e:
        out["failure"] = str(e)
    del model.lm_head.forward
    out["live_after_failure"] = _live()
    out["after_failure"] = _step(model, seqs[1], mesh)
    # 4) plain checkpointing (remat off): correct only because the recompute replays the SP attention; 2x the ring
    spa.REMAT = False
    try:
        out["no_remat"] = _step(model, seqs[0], mesh)
    finally:
        spa.REMAT = True
    # 5) Ulysses under checkpointing: not remat-aware, the recompute re-runs it under the replayed attention
    out["ulysses"] = _step(model, seqs[0], mesh, "ulysses")
    return out


def _close(got, want):
    assert set(got) == set(want) and len(want) > 10
    for n, g in want.items():
        assert (got[n] - g).abs().max() <= TOL, n


def test_checkpointed_sp_training_reuses_ring_attention(tiny_ckpt, synth_dir):
    """SP=2 + FSDP2 + activation checkpointing (sft.py's forward-then-backward): the ring forward runs once per
    layer, the recompute reuses it (hits == layers; plain checkpointing: 2x the ring forwards), gradients equal the
    run without checkpointing, and no kept output survives a step, a no-grad prefill or a failed forward."""
    seqs = [_seq(tiny_ckpt, synth_dir, i) for i in range(2)]
    for res in run_distributed(_train_worker, 2, args=(tiny_ckpt, seqs)):
        L = res["layers"]
        for plain, remat in zip(res["plain"], res["remat"]):
            assert plain["stats"]["ring_fwd"] == L and plain["stats"]["remat_hits"] == 0
            assert remat["fwd_in_forward"] == L and remat["kept_after_forward"] == L, remat["stats"]
            assert remat["stats"]["ring_fwd"] == L and remat["stats"]["remat_hits"] == L, remat["stats"]
            assert remat["stats"]["ring_bwd"] == L and remat["live_after"] == (0, 0)
            _close(remat["grads"], plain["grads"])
        assert res["prefill"]["stats"]["ring_fwd"] == L and res["prefill"]["live"] == (0, 0)
        assert "simulated failure" in res["failure"] and res["live_after_failure"] == (0, 0)
        after = res["after_failure"]
        assert after["stats"]["ring_fwd"] == L and after["stats"]["remat_hits"] == L
        _close(after["grads"], res["plain"][1]["grads"])
        no_remat = res["no_remat"]
        assert no_remat["stats"]["ring_fwd"] == 2 * L and no_remat["stats"]["remat_hits"] == 0
        _close(no_remat["grads"], res["plain"][0]["grads"])
        assert res["ulysses"]["stats"]["remat_hits"] == 0 and res["ulysses"]["live_after"] == (0, 0)
        _close(res["ulysses"]["grads"], res["plain_ulysses"]["grads"])


# ----------------------------------------------------------------------------------------------------------
# bad set-ups: clear errors instead of a CheckpointError in backward or a hang in the ring

def _errors_worker(ckpt, seqs):
    from mrsp import load_model, setup_mesh, sp_logprobs
    mesh = setup_mesh(2)
    model, _ = load_model(ckpt)
    model.model.visual.requires_grad_(False)
    errors = {}
    try:   # each SP rank given a different sequence: caught once, before any collective of the forward
        sp_logprobs(model, seqs[dist.get_rank()], group=mesh.sp_group)
    except ValueError as e:
        errors["mismatch"] = str(e)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:   # HF's own checkpointing would recompute with the model's sdpa on the local shard
        sp_logprobs(model, seqs[0], group=mesh.sp_group)
    except ValueError as e:
        errors["hf_checkpointing"] = str(e)
    return errors


def test_sp_setup_errors_are_clear(tiny_ckpt, synth_dir):
    seqs = [_seq(tiny_ckpt, synth_dir, i) for i in range(2)]
    n = [s["input_ids"].numel() for s in seqs]
    assert n[0] != n[1]
    for res in run_distributed(_errors_worker, 2, args=(tiny_ckpt, seqs)):
        assert "total_len differs across the 2 ranks" in res["mismatch"], res
        assert f"rank 0 has {n[0]}, rank 1 has {n[1]}" in res["mismatch"]
        assert "mrsp.prepare_model(model, mesh, activation_checkpointing=True)" in res["hf_checkpointing"]
