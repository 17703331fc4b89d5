"""Training loops for the parts of a method that learn: `trajectory` (the trajectory branch) and `lion`
(a LiON-LoRA adapter and its scaling-token embedding)."""
