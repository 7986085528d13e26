mod common;
mod sandbox;
mod cli;
