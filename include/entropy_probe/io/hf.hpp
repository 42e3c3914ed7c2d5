// Hugging Face checkpoints, PEFT LoRA adapters, token batches and Adam state
// (docs/checkpoints.md), one header per job under io/hf/.
//
// A checkpoint directory holds config.json (model_type gpt2 or qwen2), the
// base weights (model.safetensors, or shards listed by
// model.safetensors.index.json), optionally a PEFT adapter
// (adapter_config.json + adapter_model.safetensors) and optionally the Adam
// state (optimizer.safetensors). Every reader validates before it trusts:
// each error is an InputError naming the file, the key and the problem.
#pragma once

#include "entropy_probe/io/hf/batch_file.hpp"
#include "entropy_probe/io/hf/config.hpp"
#include "entropy_probe/io/hf/json_fields.hpp"
#include "entropy_probe/io/hf/optimizer_state.hpp"
#include "entropy_probe/io/hf/weights.hpp"
#include "entropy_probe/io/hf/writer.hpp"
