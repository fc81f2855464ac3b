//! See the module list in `peers`.
