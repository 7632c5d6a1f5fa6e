"""The guest agent: PID 1 inside the VM. Imports only the stdlib and fcvm.session."""
