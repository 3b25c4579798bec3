// TLS for the cluster's gRPC channels.
//
// - The public port: the coordinator's certificate (--tls-cert/--tls-key); gemmactl (--tls-ca)
//   and workers (--coordinator-ca) verify it against a CA file.
// - The internal port (mutual TLS): the coordinator serves the workers' service with its
//   internal certificate and accepts only clients whose certificate its --internal-ca signed;
//   workers present theirs (--tls-cert/--tls-key), serve their replica port with it, and accept
//   only the coordinator's (signed by the CA they verify it with).
// Without a CA file a channel speaks plaintext.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace gemma {

// The whole of a PEM file; NOT_FOUND naming it when it cannot be read, INVALID_ARGUMENT when
// it holds no PEM block. `what` names it in messages ("the CA file --tls-ca").
absl::StatusOr<std::string> ReadPemFile(const std::string& path, const std::string& what);

// A certificate and its key as flags name them, for messages.
struct CertificateFiles {
  std::string cert;
  std::string key;
  std::string cert_flag = "--tls-cert";
  std::string key_flag = "--tls-key";
};

// Checks a certificate before it is used, so that a bad one is refused with its reason rather
// than as a failed handshake: both files or neither (OK for neither), the first certificate of
// the chain parses, is within its validity period ("expired on ..." / "not valid before ...")
// and the key belongs to it.
absl::Status CheckCertificate(const CertificateFiles& files);

// TLS credentials trusting the CAs of `ca_file`, or plaintext when it is empty; with
// `client` (checked as by CheckCertificate), they present that certificate (mutual TLS).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(
    const std::string& ca_file, const CertificateFiles& client = {});

inline absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> CoordinatorCredentials(
    const std::string& ca_file) {
  return ChannelCredentialsFor(ca_file);
}

// Server credentials: plaintext for an empty certificate; TLS with it; with `client_ca` as
// well, mutual TLS: only clients whose certificate `client_ca` signed get in.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(
    const CertificateFiles& server, const std::string& client_ca = "");

// A hint for a failed TLS connection whose gRPC message speaks of the handshake, or of a socket
// closed or reset by the server, as a refused client certificate shows under TLS 1.3 (empty
// otherwise: say a refused connection): what to check on the client's side.
std::string HandshakeHint(const std::string& grpc_message, bool have_client_certificate);

}  // namespace gemma
