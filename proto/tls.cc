#include "proto/tls.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace gemma {
namespace {

struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Free {
  void operator()(X509* cert) const { X509_free(cert); }
};
struct KeyFree {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};

std::string TimeText(const ASN1_TIME* time) {
  std::unique_ptr<BIO, BioFree> out(BIO_new(BIO_s_mem()));
  if (out == nullptr || ASN1_TIME_print(out.get(), time) != 1) return "an unreadable date";
  char* data = nullptr;
  const long size = BIO_get_mem_data(out.get(), &data);
  return std::string(data, static_cast<size_t>(size));
}

}  // namespace

absl::StatusOr<std::string> ReadPemFile(const std::string& path, const std::string& what) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " is not a PEM file"));
  }
  return text.str();
}

absl::Status CheckCertificate(const CertificateFiles& files) {
  if (files.cert.empty() && files.key.empty()) return absl::OkStatus();
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(files.cert_flag, " and ", files.key_flag, " go together"));
  }
  const std::string cert_what = absl::StrCat("the certificate ", files.cert_flag);
  const std::string key_what = absl::StrCat("the key ", files.key_flag);
  absl::StatusOr<std::string> cert_pem = ReadPemFile(files.cert, cert_what);
  if (!cert_pem.ok()) return cert_pem.status();
  absl::StatusOr<std::string> key_pem = ReadPemFile(files.key, key_what);
  if (!key_pem.ok()) return key_pem.status();

  std::unique_ptr<BIO, BioFree> cert_bio(
      BIO_new_mem_buf(cert_pem->data(), static_cast<int>(cert_pem->size())));
  std::unique_ptr<X509, X509Free> cert(
      PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(cert_what, " ", files.cert, " holds no readable X.509 certificate"));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(cert_what, " ", files.cert, " expired on ",
                     TimeText(X509_get0_notAfter(cert.get())), "; renew it"));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(cert_what, " ", files.cert, " is not valid before ",
                     TimeText(X509_get0_notBefore(cert.get())),
                     "; check this machine's clock"));
  }
  std::unique_ptr<BIO, BioFree> key_bio(
      BIO_new_mem_buf(key_pem->data(), static_cast<int>(key_pem->size())));
  std::unique_ptr<EVP_PKEY, KeyFree> key(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        key_what, " ", files.key, " holds no readable private key (an unencrypted PEM key)"));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(key_what, " ", files.key,
                                                   " does not belong to ", cert_what, " ",
                                                   files.cert));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(
    const std::string& ca_file, const CertificateFiles& client) {
  if (ca_file.empty()) {
    if (!client.cert.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          client.cert_flag, " is a client certificate for a coordinator that speaks TLS; give "
          "the CA of the coordinator's certificate too"));
    }
    return grpc::InsecureChannelCredentials();
  }
  absl::StatusOr<std::string> ca = ReadPemFile(ca_file, "the CA file");
  if (!ca.ok()) return ca.status();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = *ca;
  if (!client.cert.empty() || !client.key.empty()) {
    if (absl::Status checked = CheckCertificate(client); !checked.ok()) return checked;
    absl::StatusOr<std::string> cert = ReadPemFile(client.cert, "the certificate");
    absl::StatusOr<std::string> key = ReadPemFile(client.key, "the key");
    if (!cert.ok()) return cert.status();
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *cert;
    options.pem_private_key = *key;
  }
  return grpc::SslCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(
    const CertificateFiles& server, const std::string& client_ca) {
  if (server.cert.empty() && server.key.empty()) {
    if (!client_ca.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "a CA for client certificates needs a server certificate (", server.cert_flag, ", ",
          server.key_flag, ")"));
    }
    return grpc::InsecureServerCredentials();
  }
  if (absl::Status checked = CheckCertificate(server); !checked.ok()) return checked;
  absl::StatusOr<std::string> cert = ReadPemFile(server.cert, "the certificate");
  absl::StatusOr<std::string> key = ReadPemFile(server.key, "the key");
  if (!cert.ok()) return cert.status();
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(
      client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                        : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!client_ca.empty()) {
    absl::StatusOr<std::string> ca = ReadPemFile(client_ca, "the CA file for client certificates");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  return grpc::SslServerCredentials(options);
}

std::string HandshakeHint(const std::string& grpc_message, bool have_client_certificate) {
  const std::string lower = absl::AsciiStrToLower(grpc_message);
  // A server that refuses the client's certificate under TLS 1.3 does so after the client has
  // finished its side of the handshake: the client sees the socket closed.
  if (!absl::StrContains(lower, "handshake") && !absl::StrContains(lower, "ssl") &&
      !absl::StrContains(lower, "tls") && !absl::StrContains(lower, "certificate") &&
      !absl::StrContains(lower, "socket closed") &&
      !absl::StrContains(lower, "connection reset")) {
    return "";
  }
  if (!have_client_certificate) {
    return "the TLS handshake failed: a coordinator's internal port (mutual TLS) needs a client "
           "certificate signed by its --internal-ca (give --tls-cert and --tls-key), and "
           "--coordinator-ca must be the CA of its certificate";
  }
  return "the TLS handshake failed: check that --coordinator-ca is the CA of the coordinator's "
         "certificate, that --tls-cert is signed by the CA the coordinator trusts "
         "(--internal-ca), and that the coordinator's certificate names the host in "
         "--coordinator";
}

}  // namespace gemma
