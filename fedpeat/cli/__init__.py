"""Command-line tools (launch, deploy, certs, sweep, retention, generate): each imports the
library; the library never imports them."""
