mod serve;
mod serve_support;
mod realservers;
