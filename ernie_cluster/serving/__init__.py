"""The OpenAI-compatible serving layer: protocol, parsers, HTTP app and Ray Serve deployments."""
