// PEFT LoRA settings shared by the model families (adapter_config.json).
#pragma once

#include "entropy_probe/core/config.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace entropy_probe::nn {

struct LoraConfig {
  index_t r = 8;
  double lora_alpha = 16;
  bool use_rslora = false;
  std::vector<std::string> target_modules;   // module names as PEFT matches them (suffix), e.g. "c_attn"
  std::vector<std::string> modules_to_save;  // "lm_head" makes the full lm_head weight trainable
  bool init_lora_b_zero = true;              // PEFT's default; tests use random B to avoid zero gradients

  bool targets(const std::string& module_name) const {
    return std::find(target_modules.begin(), target_modules.end(), module_name) != target_modules.end();
  }
  bool saves(const std::string& module_name) const {
    return std::find(modules_to_save.begin(), modules_to_save.end(), module_name) != modules_to_save.end();
  }
};

}  // namespace entropy_probe::nn
