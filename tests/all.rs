mod serve;
mod serve_support;
