//! The command line: policy check, shipped runtime policies, exit codes and signals.
