"""convq's HTTP face: the Flask app factory, V2 routes, web page, client and CLI."""
