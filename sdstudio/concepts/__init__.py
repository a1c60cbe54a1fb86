"""What concept methods (TI, pivotal, EDLoRA) and the Playground share: new tokens, layer-wise prompts and
region sampling. It sits below methods/ and playground/, so neither needs the other."""
