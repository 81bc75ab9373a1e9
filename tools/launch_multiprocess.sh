#!/usr/bin/env bash
# Multi-process training with launch.py: every process runs the same command; jax.distributed joins them.
#
#   tools/launch_multiprocess.sh local NUM_PROCESSES DEVICES_PER_PROCESS [launch.py flags...]
#       NUM_PROCESSES CPU processes on this machine, each with DEVICES_PER_PROCESS forced host devices,
#       joined on a free port of 127.0.0.1 (gloo collectives). Process 0 prints to the terminal and
#       writes the logs; the others write to {workdir}/outputs/logs/process_N.stderr. Ctrl-C (SIGINT)
#       or SIGTERM to this script reaches every process: they save the same step and exit.
#   tools/launch_multiprocess.sh host [launch.py flags...]
#       One process of a multi-node GPU job (one process per node, all its GPUs). Under srun the
#       coordinator, process count and rank come from SLURM; elsewhere set JAX_COORDINATOR_ADDRESS,
#       JAX_NUM_PROCESSES and JAX_PROCESS_ID. Sets the XLA GPU flags below unless XLA_FLAGS is set.
#
# sbatch example (8 nodes x 8 H200, the 100b config): save as train.sbatch, then `sbatch train.sbatch`.
#   #!/bin/bash
#   #SBATCH --job-name=neon_qtg_100b
#   #SBATCH --nodes=8
#   #SBATCH --ntasks-per-node=1          # one JAX process per node drives its 8 GPUs
#   #SBATCH --gpus-per-node=8
#   #SBATCH --cpus-per-task=64
#   #SBATCH --exclusive
#   #SBATCH --signal=TERM@300            # SIGTERM 5 minutes before the time limit: all save and exit 0
#   srun tools/launch_multiprocess.sh host --config=configs/neon_qtg_100b.py --workdir=/shared/runs/100b
# The workdir (checkpoints) and data.data_dir must be on a file system every node sees.
set -euo pipefail
cd "$(dirname "$0")/.."

# XLA flags for large GPU runs: overlap FSDP's all-gathers and reduce-scatters with the layers' compute.
gpu_xla_flags=(
  --xla_gpu_enable_latency_hiding_scheduler=true     # schedule collectives to overlap independent compute
  --xla_gpu_enable_pipelined_all_gather=true         # gather the next scanned layer's weights during this one
  --xla_gpu_enable_pipelined_reduce_scatter=true     # scatter a layer's gradients while the previous one runs
  --xla_gpu_enable_pipelined_all_reduce=true         # the same for all-reduces (data-parallel gradients)
  --xla_gpu_enable_while_loop_double_buffering=true  # double-buffer the layer scan, so the two overlap
  --xla_gpu_all_gather_combine_threshold_bytes=536870912      # combine small all-gathers up to 512 MiB
  --xla_gpu_reduce_scatter_combine_threshold_bytes=536870912  # combine small reduce-scatters up to 512 MiB
  --xla_gpu_all_reduce_combine_threshold_bytes=536870912      # combine small all-reduces up to 512 MiB
  --xla_gpu_enable_all_gather_combine_by_dim=false   # combine gathers even when their gathered axes differ
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  --xla_gpu_enable_highest_priority_async_stream=true  # collectives on a high-priority stream
)

mode="${1:-}"
case "$mode" in
  local)
    num_processes="$2"; devices="$3"; shift 3
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    workdir="runs/default"
    for arg in "$@"; do [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"; done
    mkdir -p "$workdir/outputs/logs"
    pids=()
    for ((i = 0; i < num_processes; i++)); do
      redirect=("$workdir/outputs/logs/process_$i.stderr")
      if ((i == 0)); then redirect=(/dev/stderr); fi
      JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
        python3 launch.py --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" \
        --process_id="$i" "$@" 2>>"${redirect[0]}" &
      pids+=("$!")
    done
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
    # The first process to fail (a watchdog's exit 3, a crash) stops the others: SIGTERM makes each save the
    # same step, or, blocked in a collective with the failed one, exit after training.stop_grace_seconds.
    status=0
    left=("${pids[@]}")
    while ((${#left[@]})); do
      finished=""
      wait -n -p finished "${left[@]}" && rc=0 || rc=$?
      [[ -n "$finished" ]] || continue  # the wait was cut short by a trapped signal
      still=()
      for pid in "${left[@]}"; do [[ "$pid" == "$finished" ]] || still+=("$pid"); done
      left=("${still[@]}")
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "launch_multiprocess: pid $finished exited with status $rc; stopping the other processes" >&2
        ((${#left[@]} == 0)) || kill -TERM "${left[@]}" 2>/dev/null || true
      fi
    done
    exit "$status"
    ;;
  host)
    shift
    export XLA_FLAGS="${XLA_FLAGS:-${gpu_xla_flags[*]}}"
    exec python3 launch.py "$@"
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
