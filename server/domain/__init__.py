"""Pure domain: values, rules and state machines. No gRPC, no backend imports."""
