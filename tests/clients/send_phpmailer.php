<?php
// Sends one test case through an SMTP server with PHPMailer, the way PHP web applications
// send mail: no TLS (the bridge listens on loopback only), AUTH with the mechanism given.
//
// Usage: php send_phpmailer.php HOST PORT USER PASSWORD MECHANISM CASE [ATTACHMENT_FILE]
//
// MECHANISM is PLAIN or LOGIN (PHPMailer's AuthType). CASE is one of plain, attachment,
// utf8, dots, recipients, two (two messages on one connection with SMTPKeepAlive). The test
// in real_clients.rs checks what arrived; this script prints nothing on success and exits
// non-zero with the error on stderr otherwise.

use PHPMailer\PHPMailer\PHPMailer;

// Debian's libphp-phpmailer package; the test says which package to install if it is absent.
require '/usr/share/php/libphp-phpmailer/autoload.php';

[, $host, $port, $user, $password, $mechanism, $case] = $argv;
$attachment = $argv[7] ?? null;
$tag = "php $mechanism $case";

$mail = new PHPMailer(true); // true: throw on errors instead of returning false
$mail->isSMTP();
$mail->Host = $host;
$mail->Port = (int) $port;
$mail->Hostname = 'client.test'; // EHLO name and Message-ID domain
$mail->SMTPAuth = true;
$mail->AuthType = $mechanism;
$mail->Username = $user;
$mail->Password = $password;
// Plain SMTP: no STARTTLS even if it were offered, as on a loopback-only bridge.
$mail->SMTPSecure = '';
$mail->SMTPAutoTLS = false;
$mail->Timeout = 50;
$mail->CharSet = PHPMailer::CHARSET_UTF8;
$mail->Encoding = PHPMailer::ENCODING_8BIT; // raw UTF-8 bodies; the server offers 8BITMIME
$mail->setFrom('printer@sandbox.test');

try {
    switch ($case) {
        case 'plain':
            $mail->addAddress('alice@example.test');
            $mail->Subject = $tag;
            $mail->Body = "Hello from PHPMailer.\n";
            $mail->send();
            break;
        case 'attachment':
            $mail->addAddress('alice@example.test');
            $mail->Subject = $tag;
            $mail->Body = "A 5 MB attachment follows.\n";
            $mail->addAttachment(
                $attachment, 'blob.bin', PHPMailer::ENCODING_BASE64, 'application/octet-stream'
            );
            $mail->send();
            break;
        case 'utf8':
            $mail->addAddress('alice@example.test');
            $mail->Subject = "$tag Grüße – 日本語 ✓";
            $mail->Body = "Grüße aus Köln — naïve café ✓\n";
            $mail->send();
            break;
        case 'dots':
            // Lines starting with a dot must be dot-stuffed by PHPMailer and unstuffed again.
            $mail->addAddress('alice@example.test');
            $mail->Subject = $tag;
            $mail->Body = ".leading dot\n..two dots\n.\nend\n";
            $mail->send();
            break;
        case 'recipients':
            $mail->addAddress('alice@example.test');
            $mail->addAddress('bob@example.test');
            $mail->addCC('carol@example.test');
            $mail->addBCC('dave@example.test'); // envelope only, no header
            $mail->Subject = $tag;
            $mail->Body = "To several people.\n";
            $mail->send();
            break;
        case 'two':
            // SMTPKeepAlive keeps the session open after send(), so the second message goes
            // over the same connection (a new MAIL transaction after RSET).
            $mail->SMTPKeepAlive = true;
            $mail->addAddress('alice@example.test');
            $mail->Subject = "$tag 1/2";
            $mail->Body = "First of two.\n";
            $mail->send();
            // Prove the reuse: a closed connection here would make the second send() reconnect.
            if (!$mail->getSMTPInstance()->connected()) {
                throw new Exception('the connection closed after the first message');
            }
            $mail->clearAddresses();
            $mail->addAddress('bob@example.test');
            $mail->Subject = "$tag 2/2";
            $mail->Body = "Second of two.\n";
            $mail->send();
            $mail->smtpClose();
            break;
        default:
            throw new Exception("unknown case $case");
    }
} catch (Exception $e) {
    fwrite(STDERR, "send_phpmailer.php: {$e->getMessage()}\n");
    exit(1);
}
