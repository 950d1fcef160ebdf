"""pgqueue: a PostgreSQL send queue for WhatsApp messages through Twilio."""

__version__ = "0.1.0"
