"""Running fedus across hospitals on Flower's deployment runtime: certificates, server, sites."""
