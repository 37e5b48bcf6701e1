// The NBD server. See NBDServer.swift.
