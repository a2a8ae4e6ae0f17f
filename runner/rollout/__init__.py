"""Rollouts: prompts in, sampled completions (token ids, log-probs, masks) out.

    hf             the sampling loop on a transformers model (one prefill per group, finished
                   rows leave the batch), batch helpers (RolloutBatch, select, concat, render)
    vllm           a colocated vLLM engine (GPU)
    multiturn      episodes where the environment answers between the model's turns
    fr3e           FR3E: branch new rollouts from a base trajectory's high-entropy tokens
    decode_linears faster CPU linears while decoding (packed bf16; the faster fp32 layout)
"""
