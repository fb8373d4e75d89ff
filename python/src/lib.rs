//! Python bindings (filled in by the binding work).
