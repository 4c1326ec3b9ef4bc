#!/usr/bin/env bash
# The whole pipeline on the embedded default, CPU, torchrun on 2 processes with SP=2:
#   synthetic long videos -> tiny Qwen2.5-VL -> eval (before) -> CoT-SFT -> eval -> GRPO with MR-SP -> eval
# and a last table: accuracy per category before SFT / after SFT / after RL, plus out/rl/reward_curve.png and a
# table of RL's objective (held-out sampled accuracy, avg@8 at T=1) after SFT / after RL.
# (RL: --recompute_old=0 -- one update per batch, so pi_old = pi_theta and the old-policy prefill would only
# recompute logp.detach(); same gradient, a quarter less time a step. SFT and RL run --micro_batch sequences to a
# forward, right-padded: the same loss, fewer and larger matmuls for these ~170-token sequences; 1 for long videos.)
# Run it through `bash run.sh` (installs requirements first) or directly inside the venv.
#
# Knobs, as flags (--key=value) or environment variables (KEY=value), flags win:
#   --nproc=2 --sp=2 --sft_sp=1 --frames=16 --sft_steps=3000 --rl_steps=20 --rl_prompts=32 --rl_lr=3e-4 --seed=0
#   --out=out --data=data/synth --eval_n=128 --eval_tokens=80 --sft_args="..." --rl_args="..."
#   --family=qwen2_5_vl (the tiny model's family: qwen2_vl, qwen2_5_vl or qwen3_vl; prepare.py --family)
#   --dry_run=1 prints each stage's command instead of running it
# (RL: 32-prompt steps; with 8 prompts a step the gradient noise wins on this tiny model -- BENCHMARKS.md)
# A real checkpoint and dataset on GPUs: --model=DIR (a local HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint; its
# family is its config's model_type, --family is ignored) skips the synthetic
# data and the tiny model; --data=DIR then holds train.jsonl, val.jsonl and test.jsonl (or give --train= --val=
# --test= files, and --sft_train= for SFT's own CoT split; see README and data.py for the record formats):
#   bash run.sh --model=/ckpt/Qwen2.5-VL-7B-Instruct --data=/data/lvr --nproc=8 --sp=4 --frames=256 \
#     --sft_args="--lr=1e-5 --batch_size=32 --activation_checkpointing=1 --keep_gathered=0" \
#     --rl_args="--lr=1e-6 --prompts_per_step=32 --max_new_tokens=1024 --keep_gathered=0 --engine=vllm"
set -euo pipefail
cd "$(dirname "$0")"
KNOBS="MODEL DATA TRAIN SFT_TRAIN VAL TEST NPROC SP SFT_SP FRAMES SFT_STEPS RL_STEPS RL_PROMPTS RL_LR SEED OUT EVAL_N EVAL_TOKENS
       SFT_ARGS RL_ARGS DRY_RUN FAMILY"
for arg in "$@"; do
  case "$arg" in
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --*=*) key=$(echo "${arg%%=*}" | sed 's/^--//' | tr 'a-z-' 'A-Z_')
           if ! echo " $(echo $KNOBS) " | grep -q " $key "; then
             echo "demo.sh: unknown flag ${arg%%=*} (known: $(echo $KNOBS | tr 'A-Z_' 'a-z_' | sed 's/\([a-z_]*\)/--\1/g'))" >&2
             exit 2
           fi
           export "$key=${arg#*=}" ;;
    *) echo "demo.sh: unexpected argument '$arg': expected --key=value, e.g. --model=/ckpt/qwen --data=/data/lvr" >&2
       exit 2 ;;
  esac
done
NPROC=${NPROC:-2}
SP=${SP:-2}
FRAMES=${FRAMES:-16}
SEED=${SEED:-0}
OUT=${OUT:-out}
DATA=${DATA:-data/synth}
SFT_SP=${SFT_SP:-1}     # SFT data-parallel by default: a 16-frame sample is ~130 tokens, where SP only adds ring
                        # traffic (2.5x slower here); SFT_SP=2 runs it sequence-parallel (tests: SP=2 == SP=1)
SFT_STEPS=${SFT_STEPS:-3000}   # SFT's loss sits on a plateau until step 500-2000 (later with the teacher's slips in
                                # train_sft.jsonl): 1500 steps left a late start too few (BENCHMARKS.md)
RL_STEPS=${RL_STEPS:-20}
RL_PROMPTS=${RL_PROMPTS:-32}
RL_LR=${RL_LR:-3e-4}
EVAL_N=${EVAL_N:-128}
FAMILY=${FAMILY:-qwen2_5_vl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN="torchrun --standalone --nproc_per_node=$NPROC"
x() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }   # run a stage (or print it: --dry_run=1)
T0=$SECONDS
stamp() { echo "== [$(( (SECONDS - T0) / 60 ))m$(( (SECONDS - T0) % 60 ))s] $*"; }

USER_MODEL=${MODEL:-}
if [ -z "$USER_MODEL" ]; then
  stamp "1/7 synthetic long-video QA (256 frames per video) -> $DATA"
  x python prepare.py --out="$DATA"
  MODEL=$OUT/tiny
  [ "$FAMILY" = qwen2_5_vl ] || MODEL=$OUT/tiny_$FAMILY   # one folder per family: never reuse another family's
  stamp "2/7 tiny $FAMILY checkpoint -> $MODEL"
  # 8 heads (head_dim 16) and rope base 3: the M-RoPE frequencies then resolve this model's own position grid (8
  # temporal patches x 2x2 tokens); at Qwen's base (1e6, or 1e4) its few frequencies per axis are too slow to tell
  # neighbouring tokens apart (BENCHMARKS.md, "Why SFT learning is fragile"). 3 LM layers: the answer sentence repeats
  # an item of the model's own list ("The last one is ..."), a copy by content that two layers did not learn
  # (BENCHMARKS.md, "Reading vs concluding")
  [ -f "$MODEL/config.json" ] || x python prepare.py --tiny="$MODEL" --data="$DATA" --tiny_heads=8 --tiny_rope_theta=3 \
                                         --tiny_layers=3 --family="$FAMILY"
fi
TRAIN=${TRAIN:-$DATA/train.jsonl}
# SFT's CoT: the synthetic set's train_sft.jsonl (the same questions, teacher-written traces, 20% of them wrong; RL is
# rewarded by train.jsonl's answer key -- prepare.py teacher_traces); a real dataset's SFT split is --sft_train=
# (default: --train, whose `reasoning` field is the CoT)
if [ -z "$USER_MODEL" ]; then SFT_TRAIN=${SFT_TRAIN:-$DATA/train_sft.jsonl}; else SFT_TRAIN=${SFT_TRAIN:-$TRAIN}; fi
VAL=${VAL:-$DATA/val.jsonl}
TEST=${TEST:-$DATA/test.jsonl}
if [ -n "$USER_MODEL" ] || [ "${DRY_RUN:-0}" != 1 ]; then   # (a dry run of the synthetic demo creates nothing)
  [ -d "$MODEL" ] || { echo "demo.sh: --model=$MODEL: no such checkpoint directory" >&2; exit 2; }
  for f in "$TRAIN" "$SFT_TRAIN" "$VAL" "$TEST"; do
    [ -f "$f" ] || { echo "demo.sh: $f not found: --data=DIR must hold train.jsonl, val.jsonl and test.jsonl (or" \
                          "pass --train= --val= --test=; SFT reads --sft_train=, the synthetic set's train_sft.jsonl:" \
                          "re-run prepare.py --out=DIR if it is missing)" >&2; exit 2; }
  done
fi
# micro-batches: the tiny model's ~170-token sequences run 4 (SFT) / 8 (RL) to a forward; a real checkpoint's long
# videos one at a time (--micro_batch=1, the stage scripts' default: a batch of hour-long videos would not fit)
MB_SFT=4; MB_RL=8
[ -z "$USER_MODEL" ] || { MB_SFT=1; MB_RL=1; }
EVAL="eval.py --data=$TEST --frames=$FRAMES --max_samples=$EVAL_N --max_new_tokens=${EVAL_TOKENS:-80}"
SAMPLED="eval.py --data=$TEST --frames=$FRAMES --max_samples=$EVAL_N --max_new_tokens=${EVAL_TOKENS:-80} \
  --temperature=1 --samples=8"

stamp "3/7 eval before SFT"
x $RUN $EVAL --model="$MODEL" --out_dir="$OUT/eval/base"

stamp "4/7 CoT-SFT ($SFT_STEPS steps, SP=$SFT_SP, frozen vision tower, cached video embeddings)"
x $RUN sft.py --model="$MODEL" --data="$SFT_TRAIN" --val_data="$VAL" --out_dir="$OUT/sft" --sp="$SFT_SP" --frames="$FRAMES" \
  --steps="$SFT_STEPS" --lr=1e-2 --warmup_steps=20 --batch_size=8 --micro_batch=$MB_SFT --freeze_vision=1 --eval_every=500 \
  --eval_samples=32 --max_new_tokens=80 --save_every=500 --seed="$SEED" --log_every=50 ${SFT_ARGS:-}

stamp "5/7 eval after SFT (greedy on test; 8 sampled answers per test question, T=1: RL's objective)"
x $RUN $EVAL --model="$OUT/sft/hf" --out_dir="$OUT/eval/sft"
x $RUN $SAMPLED --model="$OUT/sft/hf" --out_dir="$OUT/eval/sft_sampled"

stamp "6/7 GRPO with MR-SP ($RL_STEPS steps, SP=$SP)"
# (--val_data= : no in-loop greedy evals; the evals around this stage measure it)
x $RUN rl.py --model="$OUT/sft/hf" --data="$TRAIN" --val_data= --out_dir="$OUT/rl" --sp="$SP" --frames="$FRAMES" \
  --steps="$RL_STEPS" --prompts_per_step="$RL_PROMPTS" --group_size=8 --max_new_tokens=80 --lr="$RL_LR" \
  --micro_batch=$MB_RL --kl_coef=0 --recompute_old=0 --save_every=10 --seed="$SEED" ${RL_ARGS:-}

stamp "7/7 eval after RL"
x $RUN $EVAL --model="$OUT/rl/hf" --out_dir="$OUT/eval/rl"
x $RUN $SAMPLED --model="$OUT/rl/hf" --out_dir="$OUT/eval/rl_sampled"

stamp "results (held-out test split, $FRAMES frames per video, greedy)"
x python eval.py --stages "before SFT=$OUT/eval/base" "after SFT=$OUT/eval/sft" "after RL=$OUT/eval/rl" \
  --reward_curve="$OUT/rl/metrics.jsonl" --checks=chance
stamp "RL's objective: held-out test split, 8 sampled answers per question at T=1 (avg@8)"
x python eval.py --stages "after SFT=$OUT/eval/sft_sampled" "after RL=$OUT/eval/rl_sampled" --checks=chance,gain
stamp "demo: done"
