"""rl.py's RL options (issue #20) against independent float64 references written as verl 0.9's core_algos
(compute_policy_loss_vanilla with dual clip, compute_policy_loss_gspo, agg_loss, kl_penalty, the outcome advantage
estimators, rollout-correction TIS) and TRL 1.16's GRPOTrainer (loss_type, importance_sampling_level="sequence",
vllm_importance_sampling_*) compute them: plain per-token loops, not rl.py's vectorised code. Then the flags'
validation, the split of a batch over micro-batches / ranks, and one end-to-end run with several options at once."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import rl
from dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-12
F64 = torch.float64


# ----------------------------------------------------------------------------- references (loops, float64)
def _kl_ref(lp, ref, kind):
    """verl kl_penalty_forward(logprob, ref_logprob, kind) on one token; "k3" here is TRL's unclamped k3."""
    if kind in ("k1", "kl"):
        return lp - ref
    if kind == "abs":
        return abs(lp - ref)
    if kind in ("k2", "mse"):
        return 0.5 * (lp - ref) ** 2
    if kind == "k3":                                     # TRL: exp(ref - logp) - (ref - logp) - 1
        return torch.exp(ref - lp) - (ref - lp) - 1
    kl = torch.clamp(ref - lp, min=-20, max=20)          # verl low_var_kl (and verl's "k3")
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def _agg_ref(rows, mode, B=None, T=None, ntok=None):
    """verl agg_loss with global-batch numbers on a list of per-sequence lists of per-token losses (masked tokens
    already dropped). B: global_batch_size, T: loss_scale_factor, ntok: batch_num_tokens."""
    B = len(rows) if B is None else B
    ntok = sum(len(r) for r in rows) if ntok is None else ntok
    if mode == "token-mean":
        return sum(x for r in rows for x in r) / ntok
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / B
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / max(len(r), 1) for r in rows) / B
    assert mode == "seq-mean-token-sum-norm"
    return sum(sum(r) / T for r in rows) / B


def _reference(logp, old, ref, adv, mask, cl, ch, beta=0.0, agg="token-mean", c=0.0, policy_loss="vanilla",
               kl_type="k3", entropy=None, ent_coef=0.0, rollout=None, cap=0.0, tis_mode="truncate", T=None):
    """The whole loss, token by token. gspo as verl writes it: token t of response i carries
    exp(sg[mean log ratio of i] + logp_t - sg[logp_t]) (log clamped at 10), aggregated seq-mean-token-mean."""
    B, Tm = logp.shape
    pg_rows, kl_rows, ent_rows, clipped, lower, trunc, gaps = [], [], [], 0, 0, 0, []
    for i in range(B):
        toks = [t for t in range(Tm) if mask[i, t]]
        seq_lr = sum(float((logp[i, t] - old[i, t]).detach()) for t in toks) / max(len(toks), 1)
        row, krow, erow = [], [], []
        for t in toks:
            if policy_loss == "gspo":
                rho = torch.exp(torch.clamp(logp[i, t] - logp[i, t].detach() + seq_lr, max=10.0))
            else:
                rho = torch.exp(logp[i, t] - old[i, t])
            l1, l2 = -adv[i] * rho, -adv[i] * torch.clamp(rho, 1 - cl, 1 + ch)
            tok = max(l1, l2)
            clipped += bool(l2 > l1)
            if c and policy_loss == "vanilla" and adv[i] < 0:
                lower += bool(tok > -adv[i] * c)
                tok = min(tok, -adv[i] * c)
            if rollout is not None:
                w = math.exp(float(old[i, t] - rollout[i, t]))
                gaps.append(abs(float(old[i, t] - rollout[i, t])))
                trunc += bool(cap and w > cap)
                if cap:
                    tok = tok * (min(w, cap) if tis_mode == "truncate" else (0.0 if w > cap else w))
            row.append(tok)
            if ref is not None:
                krow.append(_kl_ref(logp[i, t], ref[i, t], kl_type))
            if entropy is not None:
                erow.append(entropy[i, t])
        pg_rows.append(row); kl_rows.append(krow); ent_rows.append(erow)
    T = Tm if T is None else T
    loss = _agg_ref(pg_rows, "seq-mean-token-mean" if policy_loss == "gspo" else agg, T=T)
    if beta:
        loss = loss + beta * _agg_ref(kl_rows, agg, T=T)
    if ent_coef:
        loss = loss - ent_coef * _agg_ref(ent_rows, agg, T=T)
    n = int(mask.sum())
    return loss, dict(clip_frac=clipped / n, clip_frac_lower=lower / n, trunc=trunc / n,
                      gap_mean=sum(gaps) / max(len(gaps), 1), gap_max=max(gaps, default=0.0),
                      kl=sum(float(torch.as_tensor(k).detach()) for r in kl_rows for k in r) / n)


def _batch(B=5, T=7, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g, dtype=F64)
    old = logp + spread * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    rollout = old + 0.4 * torch.randn(B, T, generator=g, dtype=F64)     # the engine's (bf16, own kernels) view
    adv = torch.randn(B, generator=g, dtype=F64)
    adv[1] = -abs(adv[1]) - 0.5                                          # negative advantages for the dual clip
    old[1, :4] = logp[1, :4] - torch.tensor([2.0, 1.5, 0.1, -0.3], dtype=F64)   # ratios e^2, e^1.5 > 3: capped
    ent = 2 * torch.rand(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :3] = True
    mask[1, :4] = True
    mask[2] = False                                                      # an empty response (all masked)
    return logp, old, ref, rollout, adv, mask, ent


CASES = [  # (agg, policy_loss, clip_ratio_c, kl_type, beta, entropy_coef, tis_cap, tis_mode)
    ("token-mean", "vanilla", 0.0, "k3", 0.0, 0.0, 0.0, "truncate"),
    ("token-mean", "vanilla", 3.0, "low_var_kl", 0.1, 0.01, 2.0, "truncate"),
    ("seq-mean-token-sum", "vanilla", 3.0, "k1", 0.05, 0.0, 0.0, "truncate"),
    ("seq-mean-token-mean", "vanilla", 2.5, "k2", 0.1, 0.02, 1.2, "mask"),
    ("seq-mean-token-sum-norm", "vanilla", 3.0, "abs", 0.1, 0.0, 1.5, "truncate"),
    ("token-mean", "gspo", 3.0, "k3", 0.1, 0.01, 0.0, "truncate"),
    ("seq-mean-token-sum-norm", "gspo", 0.0, "low_var_kl", 0.05, 0.0, 1.2, "mask"),
]


def _call(logp, old, ref, rollout, adv, mask, ent, case, cl=0.2, ch=0.3, **kw):
    agg, pl, c, kt, beta, ec, cap, mode = case
    return rl.grpo_loss(logp, old, ref, adv, mask, clip_low=cl, clip_high=ch, kl_coef=beta, agg=agg, clip_ratio_c=c,
                        policy_loss=pl, kl_type=kt, entropy=ent, entropy_coef=ec, rollout_logp=rollout, tis_cap=cap,
                        tis_mode=mode, **kw)


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_grpo_loss_matches_verl_and_trl_formulas(case):
    """Value, gradient (w.r.t. logp and the entropies) and stats against the per-token reference, to 1e-12."""
    agg, pl, c, kt, beta, ec, cap, mode = case
    cl, ch = (3e-2, 4e-2) if pl == "gspo" else (0.2, 0.3)
    logp, old, ref, rollout, adv, mask, ent = _batch()
    lp_r, ent_r = logp.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    want, wst = _reference(lp_r, old, ref, adv, mask, cl, ch, beta, agg, c, pl, kt, ent_r, ec, rollout, cap, mode)
    want.backward()
    lp = torch.where(mask, logp, -float("inf")).requires_grad_(True)   # masked slots hold garbage: must not leak
    e = ent.clone().requires_grad_(True)
    loss, st = _call(lp, old, ref, rollout, adv, mask, e, case, cl=cl, ch=ch)
    loss.backward()
    assert abs(loss.item() - want.item()) <= TOL * max(1.0, abs(want.item())), (loss.item(), want.item())
    assert torch.allclose(lp.grad, lp_r.grad, rtol=0, atol=TOL) and (lp.grad[~mask] == 0).all()
    if ec:
        assert torch.allclose(e.grad, ent_r.grad, rtol=0, atol=TOL) and e.grad[mask].abs().max() > 0
    assert abs(st["clip_frac"].item() - wst["clip_frac"]) <= TOL
    assert abs(st["clip_frac_lower"].item() - wst["clip_frac_lower"]) <= TOL
    assert abs(st["tis_trunc_frac"].item() - wst["trunc"]) <= TOL
    assert abs(st["tis_mismatch_mean"].item() - wst["gap_mean"]) <= TOL
    assert abs(st["tis_mismatch_max"].item() - wst["gap_max"]) <= TOL
    assert abs(st["kl"].item() - wst["kl"]) <= TOL
    if c and pl == "vanilla":
        assert wst["clip_frac_lower"] > 0             # the batch really reaches the dual clip
    if cap:
        assert wst["trunc"] > 0                       # ... and the TIS cap


def test_dual_clip_caps_negative_advantages():
    """A < 0 and ratio 5 > c = 3: vanilla PPO's loss -A*5 (clip does not bound it from above) becomes -A*3 with no
    gradient; positive advantages and ratios below c are untouched."""
    logp = torch.tensor([[math.log(5.0)], [math.log(2.0)], [math.log(5.0)]], dtype=F64)
    old, adv = torch.zeros(3, 1, dtype=F64), torch.tensor([-1.0, -1.0, 1.0], dtype=F64)
    mask = torch.ones(3, 1, dtype=torch.bool)
    lp = logp.clone().requires_grad_(True)
    loss, st = rl.grpo_loss(lp, old, None, adv, mask, clip_low=0.2, clip_high=0.3, clip_ratio_c=3.0,
                            agg="seq-mean-token-sum")
    loss.backward()
    # per sequence: min(max(5, 1.3), 3) = 3; max(2, 1.3) = 2 (below c); A > 0: max(-5, -1.3) = -1.3 (clipped)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.3) / 3, abs=1e-15)
    assert lp.grad[0, 0] == 0 and lp.grad[1, 0] == pytest.approx(2.0 / 3) and lp.grad[2, 0] == 0
    assert st["clip_frac_lower"].item() == pytest.approx(1 / 3)
    off, _ = rl.grpo_loss(logp, old, None, adv, mask, clip_low=0.2, clip_high=0.3, agg="seq-mean-token-sum")
    assert off.item() == pytest.approx((5.0 + 2.0 - 1.3) / 3, abs=1e-15)      # clip_ratio_c=0: no dual clip


def test_verl_seq_mean_token_sum_is_T_times_the_old_one():
    """The porting trap of issue #20: this repo's old "seq-mean-token-sum" (sum / (B*T), Dr. GRPO) is verl's
    seq-mean-token-sum-norm; verl's seq-mean-token-sum (sum / B) is T times it. The old "seq-mean" is
    seq-mean-token-mean. Old names: an error naming the new one (grpo_loss), a note and the mapping (flags)."""
    logp, old, ref, _, adv, mask, _ = _batch(seed=3)
    B, T = logp.shape
    f = lambda agg: rl.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1, agg=agg)[0].item()   # noqa: E731
    assert f("seq-mean-token-sum") == pytest.approx(T * f("seq-mean-token-sum-norm"), rel=1e-13)
    per_tok = rl.grpo_loss(logp, old, ref, adv, mask, kl_coef=0.1, agg="token-mean")[0].item() * mask.sum().item()
    assert f("seq-mean-token-sum-norm") == pytest.approx(per_tok / (B * T), rel=1e-13)   # the old formula
    assert f("seq-mean-token-sum") == pytest.approx(per_tok / B, rel=1e-13)
    with pytest.raises(ValueError, match="agg='seq-mean'.*verl's name is 'seq-mean-token-mean'"):
        rl.grpo_loss(logp, old, ref, adv, mask, agg="seq-mean")


def _trl_loss(per_token_loss, mask, loss_type, max_completion_length=None, num_items_in_batch=None):
    """TRL 1.16 GRPOTrainer._compute_loss's aggregation, as written there (one micro-batch, one process)."""
    m = mask.to(per_token_loss.dtype)
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_completion_length)
    assert loss_type == "dapo"
    return (per_token_loss * m).sum() / num_items_in_batch


@pytest.mark.parametrize("trl,agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                     ("dr_grpo", "seq-mean-token-sum-norm"), ("dapo", "token-mean")])
def test_agg_modes_are_trl_loss_types(trl, agg):
    """TRL's per-token loss (-min(coef_1 A, coef_2 A) + beta k3; vllm TIS on the first term) aggregated by TRL's
    loss_type = grpo_loss with the mapped agg (the README's table). dapo's normaliser is the global token count:
    here the 2-sequence half of a 5-sequence batch, with the whole batch's count."""
    logp, old, ref, rollout, adv, mask, _ = _batch(seed=4)
    eps_lo, eps_hi, beta, cap, L = 0.2, 0.28, 0.04, 2.0, 9
    sl = slice(0, 2) if trl == "dapo" else slice(None)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token = per_token * torch.clamp(torch.exp(old - rollout), max=cap)          # token_truncate
    per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    want = _trl_loss(per_token[sl], mask[sl], trl, max_completion_length=L, num_items_in_batch=mask.sum())
    got, _ = rl.grpo_loss(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], clip_low=eps_lo, clip_high=eps_hi,
                          kl_coef=beta, agg=agg, rollout_logp=rollout[sl], tis_cap=cap, clip_ratio_c=0.0,
                          loss_scale_factor=L, batch_num_tokens=mask.sum() if trl == "dapo" else None)
    assert abs(got.item() - want.item()) <= TOL


def test_gspo_is_trl_sequence_level_importance_sampling():
    """GSPO: every token of response i sees rho_i = (pi/pi_old)(y_i)^(1/|y_i|). verl's token form (rl.py) and TRL's
    importance_sampling_level="sequence" (the ratio straight from the mean log ratio) with loss_type "grpo" give
    the same loss AND gradient. A response whose rho_i leaves [1 - 3e-4, 1 + 4e-4] with A > 0 is clipped whole
    (no gradient on any of its tokens); clip_ratio_c does not apply to GSPO (as verl)."""
    logp, old, _, _, adv, mask, _ = _batch(seed=5, spread=1e-4)
    old[0], adv[0] = logp[0] - 0.01, 1.0                       # response 0 far outside the GSPO range, A > 0
    lo, hi = 3e-4, 4e-4
    lp = logp.clone().requires_grad_(True)
    loss, st = rl.grpo_loss(lp, old, None, adv, mask, clip_low=lo, clip_high=hi, policy_loss="gspo",
                            clip_ratio_c=3.0, agg="token-mean")          # agg: for the KL / entropy terms only
    loss.backward()
    lp_t = logp.clone().requires_grad_(True)                  # TRL 1.16 _compute_loss, importance_sampling_level
    m = mask.to(F64)
    log_w = (((lp_t - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - lo, 1 + hi)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None]).expand_as(lp_t)
    want = _trl_loss(per_token, mask, "grpo")
    want.backward()
    assert abs(loss.item() - want.item()) <= TOL
    assert torch.allclose(lp.grad, lp_t.grad, rtol=0, atol=TOL)
    assert (lp.grad[0] == 0).all() and lp.grad[1][mask[1]].abs().min() > 0
    assert st["clip_frac"].item() >= mask[0].sum().item() / mask.sum().item()
    n = mask.sum(-1)
    ratio_tokens = torch.where(mask, torch.exp(((logp - old) * mask).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]),
                               0)
    assert abs(st["ratio_mean"].item() - ratio_tokens.sum().item() / mask.sum().item()) <= TOL
    assert ratio_tokens[0, 0].item() == pytest.approx(math.exp(0.01), rel=1e-12)
    same, _ = rl.grpo_loss(logp, old, None, adv, mask, clip_low=lo, clip_high=hi, policy_loss="gspo",
                           clip_ratio_c=0.0)
    assert same.item() == loss.item()


def test_kl_penalty_kinds_and_low_var_clamp():
    lp = torch.tensor([-1.0, -2.0, -0.5, -40.0, -0.1], dtype=F64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -0.1, -40.0], dtype=F64)     # last two: |ref - logp| ~ 40 (clamps)
    for kind in rl.KL_TYPES:
        got = rl.kl_penalty(lp, ref, kind)
        want = torch.stack([torch.as_tensor(_kl_ref(a, b, kind), dtype=F64) for a, b in zip(lp, ref)])
        assert torch.allclose(got, want, rtol=1e-14, atol=0), kind
    k3, low = rl.kl_penalty(lp, ref, "k3"), rl.kl_penalty(lp, ref, "low_var_kl")
    assert torch.equal(k3[:3], low[:3])                       # the same estimator inside the clamps
    assert k3[3] > 1e16 and low[3] == 10.0                    # exp(39.9): k3 explodes, low_var_kl caps at 10
    assert k3[4] == pytest.approx(38.9) and low[4] == 10.0    # exp(-20) + 20 - 1 = 19 > 10: capped too
    assert rl.kl_penalty(lp, ref, "k1")[0] == 0.5 and rl.kl_penalty(lp, ref, "kl")[1] == -1.0
    with pytest.raises(ValueError, match="kind='k4'"):
        rl.kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_global_denominators_split_exactly(case):
    """One sequence at a time with the batch's global denominators (what rl.update does over micro-batches and DP
    ranks) adds up to the whole batch's loss and gradient, in every mode (gspo's seq-mean pg term next to a
    token-mean KL term included)."""
    logp, old, ref, rollout, adv, mask, ent = _batch(seed=6)
    B, T = logp.shape
    whole_lp = logp.clone().requires_grad_(True)
    whole, _ = _call(whole_lp, old, ref, rollout, adv, mask, ent, case, loss_scale_factor=11)
    whole.backward()
    parts_lp = logp.clone().requires_grad_(True)
    total = 0.0
    for i in range(B):
        s = slice(i, i + 1)
        li, _ = _call(parts_lp[s], old[s], ref[s], rollout[s], adv[s], mask[s], ent[s], case,
                      batch_num_tokens=mask.sum().item(), global_batch_size=B, loss_scale_factor=11)
        li.backward()
        total += li.item()
    assert abs(total - whole.item()) <= TOL
    assert torch.allclose(parts_lp.grad, whole_lp.grad, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- advantages
def _verl_outcome(scores, G, estimator, lengths, norm_by_std=True, eps=1e-6):
    """verl's compute_*_outcome_advantage on an outcome reward at each response's last token (gamma 1), loops."""
    N = len(scores)
    groups = [scores[i:i + G] for i in range(0, N, G)]
    if estimator in ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"):
        out = []
        for g in groups:
            mean = sum(g) / G
            std = math.sqrt(sum((x - mean) ** 2 for x in g) / (G - 1))
            for x in g:
                if estimator == "grpo" and norm_by_std:
                    out.append((x - mean) / (std + eps))
                elif estimator == "rloo":
                    out.append(x * G / (G - 1) - mean * G / (G - 1))
                else:
                    out.append(x - mean)
        if estimator != "reinforce_plus_plus_baseline":
            return out
        scores = out
    # reinforce++: returns (= the score on every response token), masked_whiten over the (N, T) token matrix
    toks = [s for s, n in zip(scores, lengths) for _ in range(n)]
    mu = sum(toks) / len(toks)
    var = sum((x - mu) ** 2 for x in toks) / len(toks) * len(toks) / (len(toks) - 1)
    return [(s - mu) / math.sqrt(var + 1e-8) for s in scores]


@pytest.mark.parametrize("estimator", rl.ADV_ESTIMATORS)
def test_group_advantages_match_verl_estimators(estimator):
    g = torch.Generator().manual_seed(7)
    G = 4
    r = torch.rand(3 * G, generator=g, dtype=F64)
    r[:G] = r[0]                                    # one group with no spread
    lengths = torch.randint(1, 30, (3 * G,), generator=g).tolist()
    got = rl.group_advantages(r, G, estimator=estimator, lengths=lengths)
    want = torch.tensor(_verl_outcome(r.tolist(), G, estimator, lengths), dtype=F64)
    assert got.dtype == F64
    if estimator in ("grpo", "dr_grpo", "rloo"):    # verl: rounding noise / eps for an all-equal group; here 0
        assert torch.equal(got[:G], torch.zeros(G, dtype=F64))
        got, want = got[G:], want[G:]
    assert torch.allclose(got, want, rtol=0, atol=TOL), (got, want)
    if estimator == "rloo":                         # leave-one-out: r_i - mean of the other G-1
        x = r[G:2 * G]
        assert torch.allclose(got[:G], x - (x.sum() - x) / (G - 1), rtol=0, atol=TOL)
    if estimator == "grpo":
        none = rl.group_advantages(r, G, norm="none")
        assert torch.equal(none, rl.group_advantages(r, G, estimator="dr_grpo"))
    if estimator.startswith("reinforce"):           # batch whitening: token-weighted mean 0, unbiased var ~1
        n = torch.tensor(lengths, dtype=F64)
        assert abs((got * n).sum().item()) <= 1e-10
    with pytest.raises(ValueError, match="estimator='ppo'"):
        rl.group_advantages(r, G, estimator="ppo")


def _groups(rewards, lengths, G, weights):
    return [dict(weight=w, responses=[dict(total=rewards[i * G + j], tokens=[0] * lengths[i * G + j])
                                      for j in range(G)]) for i, w in enumerate(weights)]


def test_kl_in_reward_penalises_each_response_before_the_advantages(monkeypatch):
    """--kl_in_reward: verl's token_level_rewards = score at the last token - beta * kl_penalty(old, ref) per token;
    its outcome estimators sum them, so each response's reward drops by beta * (its summed KL), then grouped as
    usual. Padding groups (weight 0) get advantage 0 and add nothing to the penalty."""
    G, coef = 3, 0.05
    for k, v in dict(kl_in_reward=True, kl_coef=coef, kl_type="k1", group_size=G, adv_estimator="rloo",
                     adv_norm="std").items():
        monkeypatch.setattr(rl, k, v)
    g = torch.Generator().manual_seed(8)
    rewards = [1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0]
    lengths = [4, 2, 5, 3, 3, 6, 2, 2, 3]
    old = [torch.randn(n, generator=g, dtype=F64) - 2 for n in lengths]
    ref = [o + 0.3 * torch.randn(len(o), generator=g, dtype=F64) for o in old]
    adv, pen = rl.batch_advantages(_groups(rewards, lengths, G, [1.0, 1.0, 0.0]), old, ref)
    # verl: token-level rewards, summed per response
    scores = []
    for i in range(6):
        tlr = [-coef * float(old[i][t] - ref[i][t]) for t in range(lengths[i])]
        tlr[-1] += rewards[i]
        scores.append(sum(tlr))
    want = torch.tensor(_verl_outcome(scores, G, "rloo", lengths[:6]), dtype=torch.float32)
    assert torch.allclose(adv[:6], want, atol=1e-6) and torch.equal(adv[6:], torch.zeros(3))
    assert adv[3:6].abs().max() > 0                     # equal scores, unequal KL: the penalty alone gives signal
    assert pen == pytest.approx(sum(float((o - r).sum()) for o, r in zip(old[:6], ref[:6])), rel=1e-12)
    monkeypatch.setattr(rl, "kl_in_reward", False)
    plain, pen0 = rl.batch_advantages(_groups(rewards, lengths, G, [1.0, 1.0, 0.0]), None, None)
    assert pen0 == 0 and torch.equal(plain[3:6], torch.zeros(3))


def _rfpp_worker(rewards, lengths, G, weights):
    import torch.distributed as dist
    rl.adv_estimator, rl.group_size, rl.kl_in_reward = "reinforce_plus_plus_baseline", G, False   # spawned: fresh rl
    r = dist.get_rank()
    per = len(weights) // 2
    mine = slice(r * per * G, (r + 1) * per * G)
    adv, _ = rl.batch_advantages(_groups(rewards[mine], lengths[mine], G, weights[r * per:(r + 1) * per]), None,
                                 None, dist.group.WORLD)
    return adv.tolist()


def test_reinforce_pp_whitens_over_every_dp_rank(monkeypatch):
    """REINFORCE++ normalises over the step's whole batch: two DP ranks holding half the groups each get exactly the
    advantages of one process holding all of them (padding groups excluded from the statistics)."""
    G = 2
    rewards = [1.0, 0.0, 0.1, 0.1, 1.0, 1.0, 0.0, 0.9]
    lengths = [3, 5, 2, 2, 7, 1, 4, 4]
    weights = [1.0, 1.0, 1.0, 0.0]                     # rank 1's second group is DP padding
    for k, v in dict(adv_estimator="reinforce_plus_plus_baseline", group_size=G, kl_in_reward=False).items():
        monkeypatch.setattr(rl, k, v)
    one, _ = rl.batch_advantages(_groups(rewards, lengths, G, weights), None, None)
    want = _verl_outcome(rewards[:6], G, "reinforce_plus_plus_baseline", lengths[:6])
    assert torch.allclose(one[:6], torch.tensor(want, dtype=torch.float32), atol=1e-6) and (one[6:] == 0).all()
    r0, r1 = run_distributed(_rfpp_worker, 2, args=(rewards, lengths, G, weights))
    assert r0 + r1 == pytest.approx(one.tolist(), abs=1e-6)


# ----------------------------------------------------------------------------- flags
def test_check_config_new_flags(monkeypatch, capsys):
    for cfg, msg in ((dict(adv_estimator="ppo"), "--adv_estimator=ppo: expected one of grpo, dr_grpo, rloo"),
                     (dict(policy_loss="cispo"), "--policy_loss=cispo: expected one of vanilla, gspo"),
                     (dict(kl_type="k4"), "--kl_type=k4: expected one of k1, kl, abs, k2, mse, k3, low_var_kl"),
                     (dict(tis_mode="clip"), "--tis_mode=clip: expected one of truncate, mask"),
                     (dict(clip_ratio_c=0.5), "--clip_ratio_c=0.5: the dual-clip bound must be > 1"),
                     (dict(tis_cap=0.5), "--tis_cap=0.5: the importance-weight cap must be >= 1"),
                     (dict(gspo_clip_low=-1e-4), "--gspo_clip_low / --gspo_clip_high must be >= 0"),
                     (dict(kl_in_reward=True, kl_coef=0.0), "--kl_in_reward=1 needs --kl_coef > 0"),
                     (dict(kl_in_reward=True, adv_estimator="reinforce_plus_plus"), "per-token reward-to-go"),
                     (dict(agg="seq-sum"), "--agg=seq-sum: expected one of token-mean, seq-mean-token-sum"),
                     (dict(decode_backend="ffmpeg"), "--decode_backend='ffmpeg': expected '' (PyAV, then decord)")):
        with monkeypatch.context() as mp:
            for k, v in cfg.items():
                mp.setattr(rl, k, v)
            with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(")", r"\)")):
                rl.check_config()
    rl.check_config()                                  # the defaults pass
    with monkeypatch.context() as mp:                  # this repo's old names: mapped, with a note
        mp.setattr(rl, "agg", "seq-mean")
        rl.check_config()
        assert rl.agg == "seq-mean-token-mean"
        mp.setattr(rl, "agg", "seq-mean-token-sum")
        rl.check_config()
        assert rl.agg == "seq-mean-token-sum"
    out = capsys.readouterr().out
    assert "--agg=seq-mean is now --agg=seq-mean-token-mean" in out
    assert "old seq-mean-token-sum" in out and "now --agg=seq-mean-token-sum-norm" in out
    assert rl.agg == "token-mean" and rl.clip_ratio_c == 3.0 and rl.tis_cap == 0.0   # defaults: verl's dual clip


# ----------------------------------------------------------------------------- the loop
def _grad_entropy_supported(model, seq):
    from mrsp import sp_logprobs
    with torch.enable_grad():
        _, ent = sp_logprobs(model, seq, return_entropy="grad")
    return ent.requires_grad


def test_entropy_bonus_has_a_gradient(tiny_ckpt, synth_dir):
    """--entropy_coef: the per-token entropies come from the SP prefill's checkpointed LM-head chunks WITH gradient
    (mrsp.sp_logprobs(return_entropy="grad")), equal to the no-grad ones, and raise the entropy when followed."""
    from data import load_records
    from mrsp import EmbeddingCache, get_video_embeds, load_model, sp_logprobs
    model, processor = load_model(tiny_ckpt)
    rec = load_records(os.path.join(synth_dir, "train.jsonl"))[0]
    (vid,), _ = get_video_embeds(model, processor, [rec], EmbeddingCache(), num_frames=8)
    prompt = rl.prompt_of(rec, processor, vid)
    item = rl.make_item(prompt, processor.tokenizer("<think>a b</think><answer>A</answer>")["input_ids"], 0)
    seq = dict(item, embeds=vid["embeds"])
    assert _grad_entropy_supported(model, seq)
    m = item["loss_mask"]
    with torch.no_grad():
        _, ent0 = sp_logprobs(model, seq, return_entropy=True, logit_chunk=4)
    lp, ent = sp_logprobs(model, seq, return_entropy="grad", logit_chunk=4)      # several chunks
    assert torch.allclose(ent[m], ent0[m], atol=1e-6)
    loss, st = rl.grpo_loss(lp[m][None], lp[m].detach()[None], None, torch.zeros(1), torch.ones(1, int(m.sum()),
                            dtype=torch.bool), entropy=ent[m][None], entropy_coef=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(-ent0[m].mean().item(), rel=1e-5)     # A = 0: the bonus alone
    g = model.lm_head.weight.grad
    assert g is not None and g.abs().max() > 0


def test_end_to_end_with_several_options(tmp_path, tiny_ckpt, synth_dir):
    """rl.py with RLOO + dual clip + low_var_kl + GSPO + TIS at once: finishes, trains, logs the new metrics."""
    out = tmp_path / "opts"
    args = ["--frames=16", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=16", "--lr=1e-3", "--seed=1",
            "--steps=2", "--dynamic_sampling=1", "--max_sample_rounds=8", "--ppo_epochs=2", "--save_every=100",
            "--adv_estimator=rloo", "--clip_ratio_c=3", "--kl_type=low_var_kl", "--policy_loss=gspo",
            "--tis_cap=2", "--tis_mode=mask", "--agg=seq-mean-token-sum-norm"]
    r = subprocess.run([sys.executable, "rl.py", f"--model={tiny_ckpt}", f"--data={synth_dir}/train.jsonl",
                        "--val_data=", f"--out_dir={out}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [x["step"] for x in m] == [1, 2]
    for row in m:
        for k in ("tis_mismatch_mean", "tis_mismatch_max", "tis_trunc_frac", "clip_frac_lower", "kl", "entropy"):
            assert math.isfinite(row[k]), (k, row)
        assert 0 <= row["tis_mismatch_mean"] <= row["tis_mismatch_max"] < 1e-4   # HF engine, fp32: no mismatch
        assert row["tis_trunc_frac"] == 0
    assert sum(x["trained_groups"] for x in m) > 0 and max(x["grad_norm"] for x in m) > 0
    cfg = json.load(open(out / "config.json"))
    assert (cfg["policy_loss"], cfg["adv_estimator"], cfg["kl_type"], cfg["tis_cap"]) == ("gspo", "rloo",
                                                                                            "low_var_kl", 2.0)
