"""Load generators: `engine` drives the AsyncEngine in-process, `serving` any OpenAI-compatible
server over HTTP; both summarize with `metrics`."""
