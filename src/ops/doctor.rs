//! doctor (placeholder while building)
