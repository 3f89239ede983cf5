//! Job trees in their own namespaces.
