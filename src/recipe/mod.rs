//! Deployment recipes (being written).
