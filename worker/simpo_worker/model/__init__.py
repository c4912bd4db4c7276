"""The model: Llama in equinox, its attention, the layout of its weights and activations on a mesh, and FLOPs
counted from its shapes. May import contract only."""
