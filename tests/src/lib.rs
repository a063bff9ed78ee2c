//! End-to-end tests and repository checks live in tests/; see README.
